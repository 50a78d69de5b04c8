"""Adapters for the seeds' Q-Former models: InstructBLIP (and the forward rule shared with BLIP-2 models).

InstructBLIP puts `num_query_tokens` (32 in the released checkpoints) Q-Former outputs in front of the
prompt: the language model reads `[queries] <s> question`, as LAVIS builds its input and as the OPERA and PAI
reference codes treat it (their image span is the query tokens). So the image span of the language model's
sequence is the queries, not image patches; `image_grids` describes them as one row of `num_query_tokens`.
Attention maps over the image are carried from the queries to the ViT patch grid through the Q-Former's
cross-attention (`query_patch_attention`, `vlmscope.explain.maps.carry_queries_to_patches`).

The stock model's `forward` needs the image on every call (it re-encodes it), so forwards without
`pixel_values` (decode steps with a cache, text-only branches) go to its language model: `model_forward`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.models.adapters import Adapter, Batch, ImageGrid, LlavaAdapter


def has_qformer(model: Any) -> bool:
    """True for BLIP-2 style models (a Q-Former between the vision tower and the language model)."""
    return hasattr(model, "qformer") and hasattr(model, "language_model")


def model_forward(model: Any, **kwargs: Any) -> Any:
    """`model(**kwargs)`; for Q-Former models without `pixel_values`, their language model (same cache).

    `past_key_values` goes in as `cache` where the forward takes that name instead (transformers 5.24 renamed
    it and deprecated the old one, to be removed in 5.40).
    """
    target = model.language_model if "pixel_values" not in kwargs and has_qformer(model) else model
    if "past_key_values" in kwargs and _cache_argument(target) == "cache":
        kwargs["cache"] = kwargs.pop("past_key_values")
    return target(**kwargs)


def _cache_argument(module: Any) -> str:
    """The name under which `module`'s forward takes the KV cache."""
    names = _forward_parameters(type(module))
    for name in ("cache", "past_key_values"):
        if name in names:
            return name
    # A forward that hands **kwargs on (BLIP-2's, InstructBLIP's) takes its language model's name.
    inner = getattr(module, "language_model", None)
    return _cache_argument(inner) if inner is not None else "past_key_values"


@functools.cache
def _forward_parameters(module_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(module_class.forward).parameters)


class QFormerAdapter(Adapter):
    """Models whose language model reads Q-Former queries (BLIP-2, InstructBLIP): the queries are the image
    span; explain carries their columns to the ViT patches through the Q-Former's cross-attention."""

    family = "qformer"
    feature_inputs: tuple[str, ...] = ("pixel_values",)  # what `get_image_features` takes from the batch

    def __init__(self, model: Any, processor: Any) -> None:
        super().__init__(model, processor)
        if not getattr(model.config, "use_decoder_only_language_model", True):
            raise InputError(f"{type(model).__name__} with an encoder-decoder language model (Flan-T5) is not "
                             "supported: use a checkpoint with a decoder-only language model (Vicuna, LLaMA)")

    @property
    def num_queries(self) -> int:
        return int(self.model.config.num_query_tokens)

    def vision_tower(self) -> torch.nn.Module:
        return self.model.vision_model

    def decoder(self) -> torch.nn.Module:
        # Stock BLIP-2's get_decoder() returns the whole causal LM (InstructBLIP's its decoder); take the decoder.
        return self.model.language_model.get_decoder()

    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        """The query tokens as one row (they have no spatial layout); see `patch_grid` for the image."""
        n = int(batch.image_mask[row].sum())
        if n != self.num_queries:
            raise InputError(f"{n} image tokens in the prompt, expected the {self.num_queries} query tokens")
        return [ImageGrid("queries", 0, 1, n, n)]

    def patch_grid(self) -> ImageGrid:
        """The ViT patch grid the queries cross-attend to (the image is resized to a square, not cropped)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return ImageGrid("image", 0, side, side, side)

    @torch.no_grad()
    def query_patch_attention(self, batch: Batch) -> torch.Tensor:
        """[B, queries, patches]: each query's cross-attention to the ViT patches, mean over the Q-Former's
        cross-attention layers and heads; the CLS column is dropped (not renormalised: a row sums to 1 minus
        the query's attention to CLS).

        Computed from the queries and keys each cross-attention module receives (so it does not depend on the
        Q-Former's attention implementation): softmax(q kᵀ · scaling) over the image embeddings, which the
        stock model never masks.
        """
        inputs = {k: batch.model_inputs[k] for k in self.feature_inputs}
        probs: list[torch.Tensor] = []

        def record(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            encoder = kwargs["encoder_hidden_states"]
            heads, size = module.num_attention_heads, module.attention_head_size
            query = module.query(hidden).view(*hidden.shape[:-1], heads, size).transpose(1, 2)
            # The Q-Former may be kept in float32 under a half-precision vision tower (BLIP-2).
            encoder = encoder.to(module.key.weight.dtype)
            key = module.key(encoder).view(*encoder.shape[:-1], heads, size).transpose(1, 2)
            scores = (query @ key.transpose(-1, -2)).float() * module.scaling
            probs.append(torch.softmax(scores, dim=-1))

        handles = [layer.crossattention.attention.register_forward_pre_hook(record, with_kwargs=True)
                   for layer in self.model.qformer.encoder.layer if getattr(layer, "has_cross_attention", False)]
        try:
            self.model.get_image_features(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        if not probs:
            raise InputError("this Q-Former has no cross-attention layers")
        mean = torch.stack(probs).mean(dim=(0, 2))  # [B, queries, 1 + patches]
        return mean[:, :, 1:]


class Blip2Adapter(QFormerAdapter):
    """BLIP-2 with a decoder-only language model: MiniGPT-4 as `vlmscope convert minigpt4` writes it (its chat
    template places the query tokens inside `<Img>...</Img>`), or the stock BLIP-2 OPT checkpoints."""

    family = "blip2"
    model_types = ("blip-2",)

    def render_prompt(self, prompt: str, with_image: bool = True) -> str:
        """The chat template of the processor, else the tokenizer's (a loaded Blip2Processor loses its own)."""
        if getattr(self.processor, "chat_template", None) is not None:
            return super().render_prompt(prompt, with_image)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InputError("neither the processor nor the tokenizer has a chat template: save one with the "
                             "model (vlmscope convert minigpt4 writes MiniGPT-4's)")
        content: list[dict[str, str]] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)


class InstructBlipAdapter(QFormerAdapter):
    """InstructBLIP with a decoder-only language model (Vicuna): queries before the prompt, left padding."""

    family = "instructblip"
    model_types = ("instructblip",)
    feature_inputs = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")

    def render_prompt(self, prompt: str, with_image: bool = True) -> str:
        """The question itself (LAVIS and OPERA's `<ImageHere><question>`); a saved chat template wins."""
        if getattr(self.processor, "chat_template", None) is not None:
            return super().render_prompt(prompt, with_image)
        return prompt

    def encode(self, images: list[Any], prompts: list[str], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Batch:
        texts = [self.render_prompt(p) for p in prompts]
        text = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        ids, mask = text["input_ids"], text["attention_mask"]
        rows, width = ids.shape
        q = self.num_queries
        # The stock processor prepends the queries to the padded text ([queries, pad, <s>, ...]); the same
        # tokens left-padded ([pad, queries, <s>, ...]) give the same positions and outputs, and keep every
        # row's prompt contiguous at the right end, which the decoding loop relies on.
        input_ids = torch.full((rows, width + q), self.pad_token_id(), dtype=ids.dtype)
        attention_mask = torch.zeros((rows, width + q), dtype=mask.dtype)
        for row in range(rows):
            pads = width - int(mask[row].sum())
            input_ids[row, pads:pads + q] = self.image_token_id
            input_ids[row, pads + q:] = ids[row, pads:]
            attention_mask[row, pads:] = 1
        # The Q-Former reads the instruction too (BERT absolute positions: right padding, as LAVIS).
        qformer = self.processor.qformer_tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
        pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        model_inputs: dict[str, Any] = {
            "pixel_values": pixel_values.to(device, dtype) if dtype is not None else pixel_values.to(device),
            "qformer_input_ids": qformer["input_ids"].to(device),
            "qformer_attention_mask": qformer["attention_mask"].to(device),
        }
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        return Batch(input_ids, attention_mask, model_inputs, input_ids == self.image_token_id,
                     [tuple(im.size) for im in images], list(prompts))


class ShikraAdapter(LlavaAdapter):
    """Shikra converted to stock LLaVA (`vlmscope convert shikra`): pads images to a square with Shikra's
    colour (white, its `Expand2square`) before the stock processor, whose own padding colour differs."""

    family = "shikra"
    model_types = ("llava",)

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return getattr(model.config, "shikra_pad_color", None) is not None

    def encode(self, images: list[Any], prompts: list[str], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Batch:
        color = tuple(int(c) for c in self.model.config.shikra_pad_color)
        batch = super().encode([expand_to_square(im, color) for im in images], prompts, device, dtype)
        batch.image_sizes = [tuple(im.size) for im in images]
        return batch

    def image_grids(self, batch: Batch, row: int) -> list[ImageGrid]:
        # The grid covers the padded square, centred on the original image (overlays clip to the image).
        grid = super().image_grids(batch, row)[0]
        width, height = batch.image_sizes[row]
        side = max(width, height)
        dx, dy = (side - width) / 2 / width, (side - height) / 2 / height
        return [ImageGrid(grid.name, grid.offset, grid.height, grid.width, grid.row_stride,
                          (-dx, -dy, 1 + dx, 1 + dy))]


def expand_to_square(image: Any, color: tuple[int, ...]) -> Any:
    """The image centred on a square of `color` (Shikra's and LLaVA's expand2square)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


SEED_ADAPTERS: tuple[type[Adapter], ...] = (InstructBlipAdapter, Blip2Adapter, ShikraAdapter)


def _register() -> None:
    # Appended to the registry here (not listed in adapters.py) so families added elsewhere merge cleanly;
    # adapters.py imports this module at its end, whichever of the two is imported first.
    from vlmscope.models import adapters

    # Variants that claim some models of a shared model type (Shikra among LLaVA) come before the others.
    adapters.ADAPTERS = (ShikraAdapter, *(a for a in adapters.ADAPTERS if a not in SEED_ADAPTERS),
                         InstructBlipAdapter, Blip2Adapter)


_register()
