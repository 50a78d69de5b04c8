"""Interventions (steering methods), registered by name in `INTERVENTIONS`."""

from vlmscope.interventions import codebook as _codebook  # noqa: F401  (registers "codebook")
from vlmscope.interventions.base import INTERVENTIONS

__all__ = ["INTERVENTIONS"]
