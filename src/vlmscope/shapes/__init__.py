"""The shapes world and the tiny LLaVA trained on it (the embedded default model behind `vlmscope demo`).

- `world`: seeded procedural scenes (1-4 coloured shapes, occlusion, clutter, co-occurrence bias) with
  ground truth, captions and POPE-style questions.
- `vocab`: the closed vocabulary and the CHAIR synonym map.
- `build`: tokenizer, processor, config of the model (stock transformers classes).
- `train`: the seeded CPU training script. `evaluate`: held-out recall, CHAIR, POPE (the evaluation
  package's code on the world's ground truth), pointing-game targets (the game is `vlmscope.explain.pointing`).
- `demo_world()`: what `vlmscope demo` needs to run on this world.

The trained model lives in `vlmscope/data/models/shapes/` (`MODEL_DIR`) and loads offline with
`AutoModelForImageTextToText.from_pretrained(MODEL_DIR)` and `AutoProcessor.from_pretrained(MODEL_DIR)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    "demo_world",
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


def demo_world() -> dict[str, Any]:
    """The shapes world as `vlmscope demo` uses it.

    Keys: `scenes(n, seed) -> list[Scene]` (held-out stream), `render(scene) -> PIL.Image`, `prompt` (the
    caption prompt), `max_new_tokens`, `evaluate(vlm, n, seed, decoding, interventions, **kw) -> dict`
    (percentages: object_recall, pope_accuracy, CHAIR_S, CHAIR_I, ...), `explain_layer` (the decoder layer
    whose maps the demo shows), `objects(scene) -> [(category, colour, box)]` (ground truth for figures),
    `pointing(vlm, scenes, [(layer, head)]) -> dict` (the pointing game of `evaluate.pointing_game`).
    """
    from vlmscope.shapes.evaluate import CAPTION_TOKENS, evaluate, heldout_scenes, pointing_game

    def render(scene: Scene) -> Any:
        return scene.image()

    def objects(scene: Scene) -> list[tuple[str, str, tuple[int, int, int, int]]]:
        return [(o.category, o.colour, o.box) for o in scene.ordered()]

    return {
        "scenes": heldout_scenes,
        "render": render,
        "prompt": DEFAULT_CAPTION_PROMPT,
        "max_new_tokens": CAPTION_TOKENS,
        "evaluate": evaluate,
        "explain_layer": EXPLAIN_LAYER,
        "objects": objects,
        "pointing": pointing_game,
    }


# The decoder layer of the shipped model's pointer head (`train.POINTER_LAYER`, not imported here to keep
# torch-free imports light): the layer whose maps the demo shows when no localization head is ranked.
EXPLAIN_LAYER = 2
