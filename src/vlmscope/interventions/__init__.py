"""Interventions (steering methods), registered by name in `INTERVENTIONS`."""

from vlmscope.interventions import (  # noqa: F401  (registration)
    aai,
    codebook,
    deco,
    dola,
    fastv,
    icd,
    m3id,
    pai,
    sid,
    truncate,
    vaf,
    vcd,
    vista,
)
from vlmscope.interventions.base import INTERVENTIONS

__all__ = ["INTERVENTIONS"]
