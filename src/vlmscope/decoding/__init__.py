"""Decoding methods, registered by name in `DECODINGS` (greedy, sample, beam, and those of other modules)."""

from vlmscope.decoding import beam, greedy  # noqa: F401  (registration)
from vlmscope.decoding.base import DECODINGS, DecodingMethod, Hypothesis

__all__ = ["DECODINGS", "DecodingMethod", "Hypothesis"]
