"""Per-family knowledge: prompts, image-token positions and the 2-D grids they map to, module access.

Everything is found through the model (`get_decoder()`, config ids), never through hard-coded module paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlmscope.errors import InputError, UnsupportedModelError


@dataclass(frozen=True)
class ImageGrid:
    """A 2-D block of image tokens inside one row's image span.

    Token (r, c) of the grid sits at span index `offset + r * row_stride + c` (LLaVA-NeXT rows end with a
    newline token, so their stride is width + 1). `region` is the box (x0, y0, x1, y1) of the original image,
    as fractions of its width and height, that the grid covers.
    """

    name: str
    offset: int
    height: int
    width: int
    row_stride: int
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    def indices(self) -> np.ndarray:
        rows = np.arange(self.height)[:, None] * self.row_stride
        return self.offset + rows + np.arange(self.width)[None, :]

    def take(self, values: np.ndarray) -> np.ndarray:
        """Lay a [..., span] array of per-image-token values out as [..., height, width]."""
        return values[..., self.indices()]


@dataclass
class Batch:
    """Processor outputs for a batch plus what the decoding loop tracks."""

    input_ids: torch.Tensor  # [B, L], left-padded
    attention_mask: torch.Tensor  # [B, L]
    model_inputs: dict[str, Any]  # pixel_values, image_sizes, image_grid_thw, ... (prefill only)
    image_mask: torch.Tensor  # bool [B, L]
    image_sizes: list[tuple[int, int]]  # original (width, height) per row
    prompts: list[str]

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


class Adapter:
    """Base adapter for HF LLaVA-style image-text-to-text models."""

    family = "base"
    model_types: tuple[str, ...] = ()

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        config = model.config
        image_token_id = getattr(config, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_index", None)
        self.image_token_id = image_token_id

    @classmethod
    def accepts(cls, model: Any) -> bool:
        """Whether this adapter handles `model` among those of its `model_types` (a variant may claim some)."""
        return True

    # --- structure -------------------------------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        config = self.model.config
        return getattr(config, "text_config", None) or config

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    def decoder(self) -> torch.nn.Module:
        return self.model.get_decoder()

    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.decoder().layers)

    def vision_tower(self) -> torch.nn.Module:
        inner = getattr(self.model, "model", self.model)
        for name in ("vision_tower", "visual"):
            if hasattr(inner, name):
                return getattr(inner, name)
        raise UnsupportedModelError(f"cannot find the vision tower of {type(self.model).__name__}")

    def check_layer(self, layer: int, what: str = "layer") -> int:
        n = self.num_layers
        if not -n <= layer < n:
            raise InputError(f"{what} {layer} is out of range: this model has decoder layers 0..{n - 1}")
        return layer % n

    def check_head(self, head: int) -> int:
        n = self.num_heads
        if not 0 <= head < n:
            raise InputError(f"head {head} is out of range: this model has heads 0..{n - 1}")
        return head

    # --- special tokens --------------------------------------------------------------------------------
    def eos_token_ids(self) -> list[int]:
        """The ids that end a generation: the model's generation config, else the tokenizer's EOS (in order,
        without repeats; empty when neither has one)."""
        gen = getattr(self.model, "generation_config", None)
        value = getattr(gen, "eos_token_id", None)
        if value is None and self.tokenizer is not None:
            value = getattr(self.tokenizer, "eos_token_id", None)
        ids: list[int] = []
        for v in value if isinstance(value, list | tuple) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
        return ids

    def pad_token_id(self) -> int:
        """The id that fills finished rows: the tokenizer's, the generation config's, the first EOS, else 0."""
        for owner in (self.tokenizer, getattr(self.model, "generation_config", None)):
            value = getattr(owner, "pad_token_id", None) if owner is not None else None
            if value is not None:
                return int(value)
        eos = self.eos_token_ids()
        return eos[0] if eos else 0

    # --- prompts ---------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str, with_image: bool = True) -> str:
        """One user turn, image first then text, rendered by the processor's chat template."""
        content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None) is None:
            raise InputError(
                "the processor has no chat template: save one with the model (processor.chat_template)"
            )
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, images: list[Any], prompts: list[str], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Batch:
        texts = [self.render_prompt(p) for p in prompts]
        # Left padding for this call only: the caller's tokenizer keeps its own padding_side.
        inputs = self.processor(images=self.processor_images(images), text=texts, return_tensors="pt", padding=True,
                                padding_side="left")
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids").to(device)
        attention_mask = inputs.pop("attention_mask").to(device)
        model_inputs = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            model_inputs[key] = value
        image_mask = input_ids == self.image_token_id
        if not bool(image_mask.any(dim=1).all()):
            raise InputError("a prompt has no image tokens: check the chat template places the image")
        return Batch(input_ids, attention_mask, model_inputs, image_mask,
                     [tuple(im.size) for im in images], list(prompts))

    def processor_images(self, images: list[Any]) -> Any:
        """The images as the processor takes them for one image per prompt (a flat list for most families)."""
        return images

    def encode_text_only(self, prompts: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The same prompts without the image (for CFG's unconditional branch)."""
        texts = [self.render_prompt(p, with_image=False) for p in prompts]
        # Tokenised as the processor tokenises the image prompt (same special tokens, e.g. LLaVA's BOS).
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def position_ids(self, batch: Batch) -> torch.Tensor:
        """Positions of the prompt tokens, left-padding aware: [B, L] (or [3, B, L] for M-RoPE)."""
        positions = batch.attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)

    # --- image grids -----------------------------------------------------------------------------------
    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        raise NotImplementedError

    def image_span(self, batch: Batch, row: int) -> tuple[int, int]:
        """(start, end) of the image tokens of one row (end exclusive), for models with one contiguous run."""
        positions = batch.image_mask[row].nonzero().flatten()
        start, end = int(positions[0]), int(positions[-1]) + 1
        if end - start != len(positions):
            raise InputError("the image tokens of this prompt are not contiguous (one image per prompt)")
        return start, end


def _center_crop_region(width: int, height: int) -> tuple[float, float, float, float]:
    """Fraction box of a shortest-side resize + square centre crop (CLIP preprocessing)."""
    side = min(width, height)
    x0 = (width - side) / 2 / width
    y0 = (height - side) / 2 / height
    return (x0, y0, 1 - x0, 1 - y0)


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)

    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        n = int(batch.image_mask[row].sum())
        side = math.isqrt(n)
        if side * side != n:
            raise InputError(f"{n} image tokens do not form a square grid")
        width, height = batch.image_sizes[row]
        crops = getattr(self.processor.image_processor, "do_center_crop", True)
        region = _center_crop_region(width, height) if crops else (0.0, 0.0, 1.0, 1.0)
        return [ImageGrid("image", 0, side, side, side, region)]


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: a base view (h×w) then the any-resolution tiles, unpadded, each row ending in a newline."""

    family = "llava_next"
    model_types = ("llava_next",)
    layout_name = "LLaVA-NeXT"
    layout_hint = ""  # appended to the layout-mismatch error

    def packed_tile_size(self, side: int, height: int, width: int) -> tuple[int, int]:
        """The tile grid the model packs, from the unpadded one (LLaVA-NeXT packs it as it is)."""
        return height, width

    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        config = self.model.config
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        width, height = batch.image_sizes[row]
        best_h, best_w = _select_best_resolution((height, width), config.image_grid_pinpoints)
        tiles_h, tiles_w = best_h // vision.image_size, best_w // vision.image_size
        cur_h, cur_w = tiles_h * side, tiles_w * side
        new_h, new_w = self.packed_tile_size(side, *_unpadded_size(height, width, cur_h, cur_w))
        n = int(batch.image_mask[row].sum())
        expected = side * side + new_h * (new_w + 1)
        if n != expected:
            raise InputError(f"{self.layout_name} layout mismatch: {n} image tokens, expected {expected}"
                             f"{self.layout_hint}")
        # The unpadded tile grid covers the whole image; the base view is the image resized to a square.
        return [
            ImageGrid("base", 0, side, side, side),
            ImageGrid("tiles", side * side, new_h, new_w, new_w + 1),
        ]


def _select_best_resolution(size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """The any-resolution rule: most effective pixels, then least waste (as LLaVA-NeXT picks tiles)."""
    height, width = size
    best, best_eff, best_waste = None, -1, float("inf")
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        waste = cand_w * cand_h - effective
        if effective > best_eff or (effective == best_eff and waste < best_waste):
            best, best_eff, best_waste = (cand_h, cand_w), effective, waste
    assert best is not None
    return best


def _unpadded_size(orig_h: int, orig_w: int, cur_h: int, cur_w: int) -> tuple[int, int]:
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return cur_h - 2 * pad, cur_w
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return cur_h, cur_w - 2 * pad


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: a merged patch grid (image_grid_thw / merge²) and M-RoPE positions."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")

    def position_ids(self, batch: Batch) -> torch.Tensor:
        inner = self.model.model
        kwargs = {k: batch.model_inputs[k] for k in ("image_grid_thw", "mm_token_type_ids")
                  if k in batch.model_inputs}
        positions, _ = inner.get_rope_index(batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
        return positions

    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        merge = self.processor.image_processor.merge_size
        t, h, w = (int(v) for v in batch.model_inputs["image_grid_thw"][row])
        gh, gw = h // merge, w // merge
        if t != 1:
            raise InputError("video inputs are not supported; pass one image per prompt")
        return [ImageGrid("image", 0, gh, gw, gw)]


class TextAdapter(Adapter):
    """Minimal adapter for a causal language model without images (OPERA with an explicit image span)."""

    family = "text"


def text_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               image_span: tuple[int, int] | None = None) -> Batch:
    """A `Batch` for a plain language model: left-padded ids, optional image span (unpadded positions)."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    image_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    if image_span is not None:
        start, end = image_span
        width = input_ids.shape[1]
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(width, device=input_ids.device)[None, :] - (width - lengths)[:, None]
        image_mask = (positions >= start) & (positions < end)
    rows = input_ids.shape[0]
    return Batch(input_ids, attention_mask, {}, image_mask, [(0, 0)] * rows, [""] * rows)


ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter)


def adapter_for(model: Any, processor: Any) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types and cls.accepts(model):
            return cls(model, processor)
    from vlmscope.models.families_modern import MODERN_ADAPTERS, modern_adapter_for

    found = modern_adapter_for(model, processor)  # newer families, then the generic image-in-sequence adapter
    if found is not None:
        return found
    supported = ", ".join(t for cls in (*ADAPTERS, *MODERN_ADAPTERS) for t in cls.model_types)
    raise UnsupportedModelError(
        f"unsupported model type {model_type!r}: vlmscope supports {supported} "
        "(LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, Gemma 3), and any image-text-to-text "
        "model whose config names an image token id (generic adapter)"
    )

import vlmscope.models.families_seed  # noqa: E402, F401  (registers InstructBLIP in ADAPTERS)
