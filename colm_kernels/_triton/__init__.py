"""Shared Triton helpers (tile ordering, per-chain tables, configs). Import needs ``triton``."""
from .utils import *  # noqa: F401,F403
from .utils import __all__  # noqa: F401
