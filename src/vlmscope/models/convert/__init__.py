"""Converters from the seeds' original checkpoints to stock transformers checkpoints (`vlmscope convert`)."""

from __future__ import annotations

CONVERTERS = ("shikra", "minigpt4")
