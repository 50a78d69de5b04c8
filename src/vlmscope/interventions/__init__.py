"""Interventions (steering methods), registered by name in `INTERVENTIONS`."""

from vlmscope.interventions import aai, codebook, fastv, pai, truncate, vcd  # noqa: F401  (registration)
from vlmscope.interventions.base import INTERVENTIONS

__all__ = ["INTERVENTIONS"]
