"""Plain eager reference model (float64 correctness anchor); imports only chains and CoLMConfig."""
from .model import CoLM

__all__ = ["CoLM"]
