"""Interventions (steering methods), registered by name in `INTERVENTIONS`."""

from vlmscope.interventions.base import INTERVENTIONS

__all__ = ["INTERVENTIONS"]
