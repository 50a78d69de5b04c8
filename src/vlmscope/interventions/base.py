"""The intervention registry. Each method lives in its own module and registers itself on import."""

from __future__ import annotations

from vlmscope.decoding.session import Intervention, InterventionState
from vlmscope.registry import Registry

INTERVENTIONS = Registry("intervention")

__all__ = ["INTERVENTIONS", "Intervention", "InterventionState"]
