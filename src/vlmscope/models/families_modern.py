"""Adapters for today's families (LLaVA-OneVision, Gemma 3, Qwen3-VL, Idefics3, SmolVLM, InternVL) and the generic
image-in-sequence adapter.

Image grids (where each family's image tokens sit on the original image):
- LLaVA-OneVision: like LLaVA-NeXT, a base view (the whole image resized to one square tile, side×side tokens)
  then the any-resolution tiles, unpadded, each row ending in a newline token. When the unpadded tile grid
  holds more than 1.1² × `anyres_max_N` tiles' worth of tokens the model shrinks it bilinearly to
  (h // ratio, w // ratio); the shrunk grid still covers the whole image.
- Gemma 3: the image is resized to one square (no crop, no pan-and-scan), the SigLIP patches are average-pooled
  to `mm_tokens_per_image` tokens laid out as a square grid covering the whole image; the span is
  `<start_of_image>` + the image tokens + `<end_of_image>` (only the image tokens are in the grid).
- Qwen3-VL: as Qwen2-VL, one token per merged 2×2 block of patches (`image_grid_thw` / merge_size), the grid
  covering the whole image after the processor's resize to multiples of patch × merge.
- Idefics3 / SmolVLM: the image is resized (longest edge), stretched to whole tiles of the encoder's size and
  split row-major into rows×cols tiles, then a global view (the whole image squashed to one tile); each view's
  SigLIP patches are pixel-shuffled (scale_factor² patches per token) into a square of tokens. Tiles are
  separated by `<fake_token_around_image><row_i_col_j>` tags, so the image tokens are not one contiguous run.
  The prompt reads, per tile row, `<fake_token_around_image><row_i_col_j>` + the tile's tokens for each column,
  then a newline; then `\n<fake_token_around_image><global-img>` + the global view's tokens +
  `<fake_token_around_image>` (with `do_image_splitting` off, only that last part). SmolVLM has the same
  image processor, pixel-shuffle connector and prompt layout (its adapter subclasses Idefics3's); only its
  processor takes the images as one list per prompt.
- InternVL (HF port): the image is stretched to the cols×rows canvas of whole tiles whose aspect ratio is
  closest to its own (min_patches..max_patches tiles), cut row-major, plus a thumbnail (the whole image
  squashed to one tile) when there is more than one tile; each tile's patches are pixel-shuffled
  (downsample_ratio 0.5) into a square of tokens, all between `<img>` and `</img>`.
- Generic (any other `AutoModelForImageTextToText` with an image token id in its config): no grid is known;
  methods that only need the image span work, grid methods raise naming the family.

Gemma 3's sliding-window layers pass `sliding_window` to the attention function, which vlmscope's eager math
does not take as an argument: operations on those layers raise `UnsupportedModelError` (the engine's check),
operations on its full-attention layers run. `sliding_layers()` lists them so callers can pick layers.
"""

from __future__ import annotations

import math
from typing import Any

from vlmscope.errors import InputError, UnsupportedModelError
from vlmscope.models.adapters import (
    Adapter,
    Batch,
    ImageGrid,
    LlavaNextAdapter,
    Qwen2VLAdapter,
)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: base view then unpadded any-res tiles with a newline per row (shrunk past anyres_max_N)."""

    family = "llava_onevision"
    model_types = ("llava_onevision",)
    layout_name = "LLaVA-OneVision"
    layout_hint = " (one image per prompt)"

    def packed_tile_size(self, side: int, height: int, width: int) -> tuple[int, int]:
        # The model packs by its config's aspect-ratio rule (the processor only counts placeholders).
        config = self.model.config
        max_tiles = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_9")).removeprefix("anyres_max_"))
        ratio = math.sqrt(height * width / (max_tiles * side**2))
        if ratio > 1.1:
            height, width = int(height // ratio), int(width // ratio)
        return height, width


class Gemma3Adapter(Adapter):
    """Gemma 3: a square grid of pooled SigLIP patches over the whole (squashed) image."""

    family = "gemma3"
    model_types = ("gemma3",)

    def sliding_layers(self) -> list[int]:
        """Decoder layers with sliding-window attention (operations on them raise)."""
        types = getattr(self.text_config, "layer_types", None) or []
        return [i for i, kind in enumerate(types) if kind == "sliding_attention"]

    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        n = int(batch.image_mask[row].sum())
        side = math.isqrt(n)
        if side * side != n:
            raise InputError(f"Gemma 3: {n} image tokens do not form a square grid (one image per prompt, "
                             "pan-and-scan off)")
        return [ImageGrid("image", 0, side, side, side)]


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: as Qwen2-VL, a merged patch grid (image_grid_thw / merge²) with M-RoPE positions (interleaved
    sections, computed by the model's own `get_rope_index` from `mm_token_type_ids`). DeepStack adds vision
    features to the first decoder layers' hidden states; the attention itself is plain."""

    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def vision_fed_layers(self) -> int:
        """How many first decoder layers receive DeepStack vision features (FastV's drop must start after)."""
        return len(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or ())


class Idefics3Adapter(Adapter):
    """Idefics3: row-major tiles, then a global view, each a square of tokens."""

    family = "idefics3"
    model_types = ("idefics3",)

    def tokens_per_view(self) -> int:
        """Image tokens per tile or global view: (image_size / patch_size)² patches / scale_factor²."""
        config = self.model.config
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // int(config.scale_factor) ** 2

    def tile_layout(self, batch: Batch, row: int) -> tuple[int, int]:
        """(rows, cols) of the tiles of one row, read from its `<row_i_col_j>` tags ((0, 0): global view only)."""
        tags = {}
        for i in range(6):
            for j in range(6):
                token_id = self.tokenizer.convert_tokens_to_ids(f"<row_{i + 1}_col_{j + 1}>")
                if token_id is not None and token_id != self.tokenizer.unk_token_id:
                    tags[int(token_id)] = (i, j)
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        seen = [tags[t] for t in ids if t in tags]
        if not seen:
            return 0, 0
        return max(i for i, _ in seen) + 1, max(j for _, j in seen) + 1

    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        per_view = self.tokens_per_view()
        side = math.isqrt(per_view)
        rows, cols = self.tile_layout(batch, row)
        n = int(batch.image_mask[row].sum())
        expected = per_view * (rows * cols + 1)
        if n != expected or side * side != per_view:
            raise InputError(f"{self.family} layout mismatch: {n} image tokens, expected {expected} "
                             f"({rows}×{cols} tiles + a global view of {per_view}; one image per prompt)")
        # The processor stretches the image to rows×cols whole tiles, so each tile covers an equal share of it;
        # the global view is the whole image squashed to one tile.
        grids = [ImageGrid(f"tile_r{r}_c{c}", (r * cols + c) * per_view, side, side, side,
                           (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows))
                 for r in range(rows) for c in range(cols)]
        grids.append(ImageGrid("global", rows * cols * per_view, side, side, side))
        return grids

    def image_span(self, batch: Batch, row: int) -> tuple[int, int]:
        raise UnsupportedModelError(
            f"{self.family}: the image tokens are split by tile tags (not one contiguous span), which flow needs"
        )


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM / SmolVLM2: Idefics3's grid (the same image processor, pixel shuffle and tile tags), its own
    family name so its table row is checked on its own tiny model."""

    family = "smolvlm"
    model_types = ("smolvlm",)

    def processor_images(self, images: list[Any]) -> Any:
        # SmolVLM's processor reads a flat list as all the images of one prompt; here each prompt has one.
        return [[image] for image in images]


class InternVLAdapter(Adapter):
    """InternVL (HF port): row-major tiles of the closest-aspect-ratio canvas, then a thumbnail when tiled."""

    family = "internvl"
    model_types = ("internvl",)

    def tokens_per_view(self) -> int:
        """Image tokens per tile: (image_size / patch_size)² patches × downsample_ratio² (pixel shuffle)."""
        config = self.model.config
        vision = config.vision_config
        side = _first(vision.image_size) // _first(vision.patch_size)
        return round(side * side * float(config.downsample_ratio) ** 2)

    def tile_layout(self, width: int, height: int) -> tuple[int, int, bool]:
        """(rows, cols, thumbnail) the image processor cuts an image of this size into."""
        proc = self.processor.image_processor
        if not getattr(proc, "crop_to_patches", False):
            return 1, 1, False
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        size = proc.size
        cols, rows = get_optimal_tiled_canvas((height, width), (size["height"], size["width"]),
                                              proc.min_patches, proc.max_patches)
        return rows, cols, rows * cols > 1

    def packed_views_per_row(self, batch: Batch) -> list[int]:
        """Tiles (and thumbnail) per input in the packed pixel tensor (VCD noises each input once)."""
        per_view = self.tokens_per_view()
        return [int(n) // per_view for n in batch.image_mask.sum(dim=1).tolist()]

    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        per_view = self.tokens_per_view()
        side = math.isqrt(per_view)
        width, height = batch.image_sizes[row]
        rows, cols, thumbnail = self.tile_layout(width, height)
        n = int(batch.image_mask[row].sum())
        expected = per_view * (rows * cols + int(thumbnail))
        if n != expected or side * side != per_view:
            raise InputError(f"InternVL layout mismatch: {n} image tokens, expected {expected} ({rows}×{cols} "
                             f"tiles{' + a thumbnail' if thumbnail else ''} of {per_view}; one image per prompt)")
        # The image is stretched to cols×rows whole tiles, so each tile covers an equal share of it.
        grids = [ImageGrid(f"tile_r{r}_c{c}", (r * cols + c) * per_view, side, side, side,
                           (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows))
                 for r in range(rows) for c in range(cols)]
        if thumbnail:
            grids.append(ImageGrid("thumbnail", rows * cols * per_view, side, side, side))
        return grids


def _first(value: Any) -> int:
    return int(value[0]) if isinstance(value, list | tuple) else int(value)


class GenericAdapter(Adapter):
    """Any image-text-to-text model whose image tokens sit in the language model's sequence.

    Prompts come from the processor's chat template and positions from the attention mask; methods that need
    only the image span (OPERA, PAI, AAI with a uniform reference, VCD, truncation, FastV) work. There is no
    grid, so explain maps, flow, heads, pointing and the codebook raise naming the family.
    """

    family = "generic"

    def __init__(self, model: Any, processor: Any) -> None:
        super().__init__(model, processor)
        self.model_type = str(getattr(model.config, "model_type", type(model).__name__))
        self.family = f"generic:{self.model_type}"

    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        raise UnsupportedModelError(
            f"{self.model_type} is loaded through vlmscope's generic adapter, which knows the image span but not "
            "how its tokens lie on the image (no image grid): explain maps, flow, heads, pointing and the codebook "
            "need a family adapter; span methods (opera, pai, aai:reference=uniform, vcd, truncate, fastv) work"
        )


MODERN_ADAPTERS: tuple[type[Adapter], ...] = (LlavaOnevisionAdapter, Gemma3Adapter, Qwen3VLAdapter, Idefics3Adapter,
                                              SmolVLMAdapter, InternVLAdapter)

# Model types whose stock processor wants a video processor (torchvision) that image-only use does not need.
VIDEO_PROCESSOR_TYPES = ("llava_onevision", "qwen3_vl", "internvl", "smolvlm")


def image_token_id_of(config: Any) -> int | None:
    """The image placeholder id of a config (`image_token_id` or `image_token_index`), else None."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def modern_adapter_for(model: Any, processor: Any) -> Adapter | None:
    """A family adapter of this module, else the generic adapter when the config names an image token, else None."""
    model_type = getattr(model.config, "model_type", None)
    for cls in MODERN_ADAPTERS:
        if model_type in cls.model_types:
            return cls(model, processor)
    if image_token_id_of(model.config) is not None and hasattr(model, "get_decoder"):
        return GenericAdapter(model, processor)
    return None


def generic_loadable(config: Any) -> bool:
    """Whether `load` may hand this config to the generic adapter (an image token id in the config)."""
    return image_token_id_of(config) is not None


def load_image_only_processor(source: str, model_type: str, **hub: Any) -> Any:
    """The stock processor of `model_type` without its video processor, from a saved directory or hub id."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    from vlmscope.models.tiny import image_only_qwen_processor, image_only_smolvlm_processor

    if model_type == "smolvlm":
        processor_cls = image_only_smolvlm_processor()
    else:
        bases = {"llava_onevision": transformers.LlavaOnevisionProcessor, "qwen3_vl": transformers.Qwen3VLProcessor,
                 "internvl": transformers.InternVLProcessor}
        processor_cls = image_only_qwen_processor(bases[model_type])
    tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    image_processor = AutoImageProcessor.from_pretrained(source, **hub)
    return processor_cls.from_pretrained(source, tokenizer=tokenizer, image_processor=image_processor, **hub)


# --- the family table (`vlmscope models`, README) -------------------------------------------------------------
CAPABILITIES = ("generate", "opera", "pai", "aai", "vcd", "truncate", "fastv", "explain", "flow", "heads", "codebook")

# Cell values: "yes"; "no" (raises a one-line error naming the reason); "uniform" (AAI with
# `reference=uniform` only: no vision reference map is defined for the family); "full layers" (Gemma 3: only
# with every operation on a full-attention layer, e.g. `pai:start=5,end=6`; its sliding-window layers raise;
# truncation and FastV act on every layer from theirs to the last, which is a sliding one in Gemma 3).
# tests/test_families_modern.py runs every cell on the family's tiny model and checks the claim.
_ALL = dict.fromkeys(CAPABILITIES, "yes")
FAMILY_TABLE: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("llava", "LLaVA-1.5 (llava)", "one square patch grid, CLIP centre crop", dict(_ALL)),
    ("llava_next", "LLaVA-NeXT (llava_next)", "base view + unpadded any-res tiles, newline per row", dict(_ALL)),
    ("qwen2_vl", "Qwen2-VL, Qwen2.5-VL (qwen2_vl, qwen2_5_vl)", "merged patches (grid_thw / merge), M-RoPE",
     {**_ALL, "aai": "uniform", "codebook": "no"}),
    ("llava_onevision", "LLaVA-OneVision (llava_onevision)",
     "base view + unpadded any-res tiles, newline per row, shrunk past anyres_max_N",
     {**_ALL, "aai": "uniform", "codebook": "no"}),
    ("qwen3_vl", "Qwen3-VL (qwen3_vl)", "merged patches (grid_thw / merge), interleaved M-RoPE, DeepStack",
     {**_ALL, "aai": "uniform", "codebook": "no"}),
    ("idefics3", "Idefics3 (idefics3)",
     "row-major tiles + a global view, pixel-shuffled patches, tile tags between",
     {**_ALL, "aai": "uniform", "flow": "no", "codebook": "no"}),
    ("smolvlm", "SmolVLM, SmolVLM2 (smolvlm)", "as idefics3: row-major tiles + a global view, pixel-shuffled "
     "patches, tile tags between", {**_ALL, "aai": "uniform", "flow": "no", "codebook": "no"}),
    ("internvl", "InternVL 3 / 3.5, HF port (internvl)", "row-major tiles + a thumbnail, pixel-shuffled patches",
     {**_ALL, "aai": "uniform", "codebook": "no"}),
    ("gemma3", "Gemma 3 (gemma3)", "pooled SigLIP patches, one square over the squashed image",
     {"generate": "yes", "opera": "no", "pai": "full layers", "aai": "full layers, uniform", "vcd": "yes",
      "truncate": "no", "fastv": "no", "explain": "full layers", "flow": "no", "heads": "no",
      "codebook": "no"}),
    ("generic", "any other image-text-to-text model with an image token id in its config", "none (span only)",
     {**_ALL, "aai": "uniform", "explain": "no", "flow": "no", "heads": "no", "codebook": "no"}),
)


def family_table_markdown() -> str:
    """The family × capability table as Markdown (printed by `vlmscope models --markdown`, kept in README)."""
    head = ["family", "models (model_type)", "image grid", *CAPABILITIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family, models, grid, caps in FAMILY_TABLE:
        lines.append("| " + " | ".join([family, models, grid, *(caps[c] for c in CAPABILITIES)]) + " |")
    return "\n".join(lines)
