"""The shapes world and the tiny LLaVA trained on it (the embedded default model behind `vlmscope demo`).

- `world`: seeded procedural scenes (1-4 coloured shapes, occlusion, clutter, co-occurrence bias) with
  ground truth, captions and POPE-style questions.
- `vocab`: the closed vocabulary and the CHAIR synonym map.
- `build`: tokenizer, processor, config of the model (stock transformers classes).
- `train`: the seeded CPU training script. `evaluate`: held-out recall, CHAIR, POPE, pointing game.

The trained model lives in `vlmscope/data/models/shapes/` (`MODEL_DIR`) and loads offline with
`AutoModelForImageTextToText.from_pretrained(MODEL_DIR)` and `AutoProcessor.from_pretrained(MODEL_DIR)`.
"""

from __future__ import annotations

from pathlib import Path

from vlmscope.shapes.world import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_WORLD,
    Question,
    Scene,
    ShapeObject,
    WorldConfig,
    caption,
    existence_question,
    pope_questions,
    render_scene,
    sample_scene,
    sample_scenes,
)

MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "data" / "models" / "shapes"

__all__ = [
    "MODEL_DIR",
    "DEFAULT_CAPTION_PROMPT",
    "DEFAULT_WORLD",
    "Question",
    "Scene",
    "ShapeObject",
    "WorldConfig",
    "caption",
    "existence_question",
    "pope_questions",
    "render_scene",
    "sample_scene",
    "sample_scenes",
]
