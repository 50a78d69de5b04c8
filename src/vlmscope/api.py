"""The public entry: `vlmscope.load(...)` → `VLM` with `generate`, `explain` and `flow`.

This module sits on top of the package: it may import explain (lazily, in `VLM.explain` / `VLM.flow`), but
nothing below it imports `vlmscope.api` (explain, flow and heads take a `VLM` as an argument).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vlmscope.attention.engine import AttentionPlan
from vlmscope.decoding import DECODINGS, DecodingMethod
from vlmscope.decoding.session import GenerationRun, Intervention
from vlmscope.errors import InputError
from vlmscope.images import load_image
from vlmscope.interventions import INTERVENTIONS
from vlmscope.models.adapters import Adapter, Batch, adapter_for
from vlmscope.models.loading import load_model_and_processor

if TYPE_CHECKING:  # pragma: no cover - the explain results import nothing from here at runtime
    from vlmscope.explain.flow import FlowResult
    from vlmscope.explain.heads import HeadRanking
    from vlmscope.explain.maps import ExplainResult


@dataclass
class GenerationResult:
    """One input's generation: text, generated token ids, prompt ids and per-token log-probabilities."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    scores: list[float]
    sequence_score: float | None = None
    image_tokens: int = 0
    decoding: str = "greedy"
    interventions: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        text = self.text if len(self.text) <= 60 else self.text[:59] + "…"
        steering = f", interventions={self.interventions}" if self.interventions else ""
        return f"GenerationResult({text!r}, tokens={len(self.token_ids)}, decoding={self.decoding!r}{steering})"


def _as_list(value: Any) -> tuple[list[Any], bool]:
    if isinstance(value, list | tuple):
        return list(value), True
    return [value], False


class VLM:
    """A loaded vision-language model with its processor and family adapter."""

    def __init__(self, model: Any, processor: Any, model_id: str = "model") -> None:
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.adapter: Adapter = adapter_for(model, processor)
        self.revision: str | None = None  # the hub revision it was loaded at, for provenance

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- inputs -------------------------------------------------------------------------------------------
    def encode(self, images: Sequence[Any], prompts: Sequence[str]) -> Batch:
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} images for {len(prompts)} prompts: give one image per prompt")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError("empty prompt: give a question or instruction about the image")
        pil = [load_image(im) for im in images]
        return self.adapter.encode(pil, list(prompts), device=self.device, dtype=self.dtype)

    def resolve_decoding(self, decoding: Any) -> DecodingMethod:
        if decoding is None:
            return DECODINGS.create("greedy")
        return DECODINGS.from_config(decoding)

    def resolve_interventions(self, interventions: Any) -> list[Intervention]:
        if interventions is None:
            return []
        if isinstance(interventions, str | dict) or isinstance(interventions, Intervention):
            interventions = [interventions]
        return [i if isinstance(i, Intervention) else INTERVENTIONS.from_config(i) for i in interventions]

    # --- generation ---------------------------------------------------------------------------------------
    def generate(self, image: Any, prompt: Any, max_new_tokens: int = 64, decoding: Any = None,
                 interventions: Any = None) -> GenerationResult | list[GenerationResult]:
        """Generate for one (image, prompt) or for lists of them (a left-padded batch).

        `decoding`: a name, "name:k=v,...", a mapping with `name`, or a method instance (greedy, beam, ...).
        `interventions`: the same forms, or a list of them; they compose in the order given.
        """
        images, is_batch = _as_list(image)
        prompts, prompts_batch = _as_list(prompt)
        if len(prompts) == 1 and len(images) > 1:
            prompts = prompts * len(images)
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        method = self.resolve_decoding(decoding)
        steering = self.resolve_interventions(interventions)
        batch = self.encode(images, prompts)
        results = self.generate_batch(batch, max_new_tokens, method, steering)
        return results if (is_batch or prompts_batch) else results[0]

    def generate_batch(self, batch: Batch, max_new_tokens: int, method: DecodingMethod,
                       interventions: Sequence[Intervention] = (),
                       capture_plan: AttentionPlan | None = None) -> list[GenerationResult]:
        """Decode a prepared batch. `capture_plan`: an attention plan whose ops (captures) run in every forward."""
        tokenizer = self.adapter.tokenizer
        eos_ids = self.adapter.eos_token_ids()
        pad_id = self.adapter.pad_token_id()
        start = time.perf_counter()
        with torch.no_grad(), GenerationRun(self.model, self.adapter, batch, interventions,
                                            capture_plan=capture_plan) as run:
            hypotheses = method.decode(run, max_new_tokens, eos_ids, pad_id)
            image_tokens = run.image_tokens
        elapsed = time.perf_counter() - start
        results = []
        for row, hyp in enumerate(hypotheses):
            prompt_ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
            results.append(GenerationResult(
                text=tokenizer.decode(hyp.token_ids, skip_special_tokens=True).strip(),
                token_ids=hyp.token_ids,
                prompt_ids=prompt_ids,
                scores=hyp.scores,
                sequence_score=hyp.sequence_score,
                image_tokens=int(image_tokens[row]),
                # Full registry specs (every parameter), so a saved result says exactly what produced it.
                decoding=_spec(method),
                interventions=[_spec(i) for i in interventions],
                extras={**hyp.extras, "seconds": elapsed / max(1, len(hypotheses))},
            ))
        return results

    # --- explanations (vlmscope.explain) -----------------------------------------------------------------
    def explain(self, image: Any, prompt: Any, *, steps: Any = "all", layers: Any = "all", heads: Any = "all",
                reduce: Any = "layers,heads", reduce_op: str = "mean", scale: str = "shared",
                max_new_tokens: int = 32) -> ExplainResult | list[ExplainResult]:
        """Greedy-generate an answer and capture each generated token's attention to the image tokens.

        `image`: a path or PIL image; `prompt`: the question or instruction. Lists of images and prompts (or
        a list of images with one prompt) give a list of results, one run per input (not a padded batch).
        `steps`: "all" or generated-token indices (0 = the first token); `layers` / `heads`: "all", 14,
        "0-3", "13,24" or lists of ints (negative counts from the end). `reduce` ("none", "all" or a
        combination of "steps", "layers", "heads"), `reduce_op` ("mean", "max", "sum") and `scale`
        ("shared", "per-map") are the defaults for the result's `.reduce()`, `.plot()` and `.save()`; the
        stored maps are always raw, `[steps, layers, heads, grid_h, grid_w]`.
        """
        from vlmscope.explain.maps import explain

        pairs, is_batch = _pairs(image, prompt)
        results = [explain(self, im, p, steps=steps, layers=layers, heads=heads, reduce=reduce,
                           reduce_op=reduce_op, scale=scale, max_new_tokens=max_new_tokens) for im, p in pairs]
        return results if is_batch else results[0]

    def flow(self, image: Any, prompt: Any, answer: Any = None, *, max_new_tokens: int = 32, layers: Any = "all",
             chunk_size: int = 8, cam: str | None = "described", cam_threshold: float | None = None,
             smooth_samples: int = 0, smooth_sigma: float = 0.1, seed: int = 0) -> FlowResult | list[FlowResult]:
        """Information flow per decoder layer for `answer` (greedy-generated when None): attention shares of
        prefix / image / instruction / output, saliency flows |A ⊙ ∂L/∂A| and per-layer LLaVA-CAMs.

        Lists of images and prompts (and answers, or None) give a list of results, one run per input.
        `layers`: which decoder layers ("all", "0-15", 14, lists). `chunk_size`: layers per forward+backward
        (memory grows with it, passes shrink). `cam`: "described" (the paper), "coded" (the released script)
        or None. `cam_threshold` zeroes normalised CAM values below it (coded default 0.5). `smooth_samples`
        > 0 averages the CAM over the clean input and that many noisy copies (pixel noise std `smooth_sigma`,
        seeded by `seed`).
        """
        from vlmscope.explain.flow import flow

        pairs, is_batch = _pairs(image, prompt)
        answers = list(answer) if isinstance(answer, list | tuple) else [answer] * len(pairs)
        if len(answers) != len(pairs):
            raise InputError(f"{len(answers)} answers for {len(pairs)} inputs: give one answer per input")
        results = [flow(self, im, p, answer=a, max_new_tokens=max_new_tokens, layers=layers,
                        chunk_size=chunk_size, cam=cam, cam_threshold=cam_threshold,
                        smooth_samples=smooth_samples, smooth_sigma=smooth_sigma, seed=seed)
                   for (im, p), a in zip(pairs, answers)]
        return results if is_batch or isinstance(answer, list | tuple) else results[0]

    def heads(self, images: Any, prompt: str, *, top_k: int = 5, min_layer: int = 2) -> HeadRanking:
        """Rank localization heads (Kang et al. 2025) over `images` for one prompt.

        `images`: a directory (its image files, sorted), one path or PIL image, or a list of them. One prefill
        per image; per image the `top_k` heads by attention-sum elbow and spatial entropy (layers below
        `min_layer` excluded), then heads ranked by how often they are selected (`.heads(k)`, `.table()`).
        """
        from vlmscope.explain.heads import rank_heads

        return rank_heads(self, images, prompt, top_k=top_k, min_layer=min_layer)


def _pairs(image: Any, prompt: Any) -> tuple[list[tuple[Any, Any]], bool]:
    """(image, prompt) pairs from single values or lists (one prompt may serve every image), and whether a list
    was given."""
    images, images_listed = _as_list(image)
    prompts, prompts_listed = _as_list(prompt)
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} images for {len(prompts)} prompts: give one image per prompt")
    if not images:
        raise InputError("no inputs: give an image and a prompt (or lists of them)")
    return list(zip(images, prompts)), images_listed or prompts_listed


def _spec(method: Any) -> str:
    from vlmscope.registry import spec_string

    try:
        return spec_string(method)
    except TypeError:  # a method object not from a registry (tests, user subclasses)
        return getattr(method, "name", type(method).__name__)


def load(model: str, device: str | None = None, dtype: Any = None, *, revision: str | None = None,
         attn_implementation: str | None = None, device_map: Any = None, quantization_config: Any = None) -> VLM:
    """Load by hub id (`llava-hf/llava-1.5-7b-hf`), local directory, or built-in name (`tiny-llava`, ...).

    Nothing is downloaded unless `model` is a hub id. The keyword options go to transformers'
    `from_pretrained`: `revision` (hub branch, tag or commit), `attn_implementation` ("sdpa", "eager",
    "flash_attention_2", ...: what the model runs outside vlmscope's plans; layers a plan touches run the
    engine), `device_map` (accelerate placement; then `device` must be None) and `quantization_config`.
    Built-in tiny models take only `attn_implementation`.
    """
    hf_model, processor, model_id = load_model_and_processor(
        model, device=device, dtype=dtype, revision=revision, attn_implementation=attn_implementation,
        device_map=device_map, quantization_config=quantization_config)
    vlm = VLM(hf_model, processor, model_id)
    vlm.revision = revision
    return vlm
