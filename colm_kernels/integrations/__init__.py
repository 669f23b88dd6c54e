"""Glue to the frameworks CoLM users work in, as optional extras.

- ``colm_kernels.integrations.hf``: a Hugging Face ``transformers`` model (``pip install -e ".[hf]"``).
- ``colm_kernels.integrations.peft``: LoRA on chain layers by name with PEFT (the ``hf`` extra).
- ``colm_kernels.integrations.torchtitan``: a TorchTitan model, configs and trainer
  (``pip install -e ".[torchtitan]"``).

They run on this package's ops and backends. Importing this package imports no framework.
"""
