"""Causal tools on image tokens: logit lens, head ablation and activation patching.

All three run plain teacher-forced forwards of the stock model (no generation loop), with hooks that are
removed on exit, also on error:

- **logit lens** (`logit_lens`): the residual stream leaving each selected decoder layer at every image token,
  through the model's final norm and unembedding: per layer the top-k vocabulary tokens per image token and
  the probability of a named word at every image token, laid out on the image grid. At the last layer this
  is exactly the model's own output distribution at the image positions.
- **head ablation** (`ablate_heads`): one head's output (its slice of the input of the attention output
  projection `o_proj`) replaced by zero or by its mean over the positions of this input, at every position;
  the effect is the change of the answer's log-probability Σ log p(answer token | prefix); heads ranked by
  effect (largest drop first). Zero ablation equals zeroing the head's columns of `o_proj.weight`; the mean
  is taken over the positions of the unablated run (fixed, whichever heads are ablated together).
- **activation patching** (`patch_activations`): the residual stream *entering* a decoder layer, at the image
  tokens (all at once, or one grid token at a time), copied from the run on the clean image into the run on
  a corrupted image; restoration = (lp_patched − lp_corrupt) / (lp_clean − lp_corrupt) of the clean answer's
  log-probability (1: the patch restores the clean answer fully, 0: no effect). Patching layer 0 at every
  image token restores the clean run exactly (the text tokens are the same).

The answer is the clean image's greedy answer (EOS dropped) unless given.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vlmscope.errors import InputError, UnsupportedModelError
from vlmscope.explain.flow import FlowInputs, _answer_ids, build_inputs
from vlmscope.explain.select import check_range, parse_indices
from vlmscope.images import load_image
from vlmscope.models.adapters import ImageGrid
from vlmscope.results import prepare_output_dir, read_run, run_provenance, write_run

ABLATION_MODES = ("zero", "mean")
PATCH_POSITIONS = ("image", "each")


# --- shared pieces ------------------------------------------------------------------------------------------
def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _teacher_forced(vlm: Any, image: Any, prompt: str, answer: str | None,
                    max_new_tokens: int) -> tuple[FlowInputs, str]:
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be at least 1")
    batch = vlm.encode([load_image(image)], [prompt])
    with torch.no_grad():
        answer_ids, answer_text = _answer_ids(vlm, batch, answer, max_new_tokens)
    return build_inputs(vlm, batch, answer_ids), answer_text


def answer_logprob(vlm: Any, inputs: FlowInputs) -> float:
    """Σ over the answer tokens of log p(token | image, prompt, earlier answer tokens), one forward."""
    batch = inputs.batch
    n = len(inputs.answer_ids)
    with torch.no_grad():
        out = vlm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=inputs.positions, **batch.model_inputs, use_cache=False,
                        logits_to_keep=n + 1, return_dict=True)
    logits = out.logits[0, :n].double()
    target = torch.tensor(inputs.answer_ids, device=logits.device)
    return float(torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum())


def _grid_positions(inputs: FlowInputs) -> tuple[ImageGrid, np.ndarray]:
    """The first grid and its tokens' sequence positions [grid_h * grid_w] (row-major)."""
    grid = inputs.grids[0]
    start = inputs.image_span[0]
    return grid, start + grid.indices().ravel()


def _grid_json(grid: ImageGrid) -> dict[str, Any]:
    return {"name": grid.name, "height": grid.height, "width": grid.width, "region": list(grid.region)}


def _grid_from_json(g: dict[str, Any]) -> ImageGrid:
    return ImageGrid(g["name"], 0, g["height"], g["width"], g["width"], tuple(g["region"]))


class _SavedResult:
    """save / load of a result = run.json (kind, provenance, every scalar and list) + one npz of arrays."""

    kind: ClassVar[str]
    npz: ClassVar[str]
    arrays: ClassVar[tuple[str, ...]]

    def to_json(self) -> dict[str, Any]:
        record = {k: v for k, v in vars(self).items() if k not in self.arrays and k != "image"}
        record["grid"] = _grid_json(record["grid"]) if record.get("grid") is not None else None
        return {"kind": self.kind, **record}

    def save(self, out_dir: str | Path) -> dict[str, Any]:
        out = prepare_output_dir(out_dir, self.kind, (self.npz, "*.png"))
        np.savez_compressed(out / self.npz, **{k: getattr(self, k) for k in self.arrays})
        written = {"npz": str(out / self.npz), "run": str(write_run(out, self.kind, self.to_json()))}
        return written

    @classmethod
    def load(cls, out_dir: str | Path) -> Any:
        out = Path(out_dir)
        record = read_run(out, cls.kind)
        if not (out / cls.npz).is_file():
            raise InputError(f"{out} has no {cls.npz}: point to a directory written by vlmscope {cls.kind}")
        with np.load(out / cls.npz) as data:
            arrays = {k: data[k] for k in cls.arrays}
        record.pop("kind")
        if record.get("grid") is not None:
            record["grid"] = _grid_from_json(record["grid"])
        return cls(**record, **arrays)


# --- logit lens ---------------------------------------------------------------------------------------------
@dataclass
class LensResult(_SavedResult):
    """Logit lens at the image tokens. Arrays: `top_ids` / `top_probs` [layers, grid_h, grid_w, k] and
    `word_probs` [layers, grid_h, grid_w] (probability of `word`'s first token; NaN-free zeros without word)."""

    kind: ClassVar[str] = "lens"
    npz: ClassVar[str] = "lens.npz"
    arrays: ClassVar[tuple[str, ...]] = ("top_ids", "top_probs", "word_probs")

    layers: list[int]
    grid: ImageGrid
    word: str | None
    word_token_id: int | None
    word_token: str | None
    vocabulary: dict[str, str]  # top token id → its text, for the ids in top_ids
    prompt: str
    model_id: str
    top_ids: np.ndarray
    top_probs: np.ndarray
    word_probs: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def top_tokens(self, layer: int, row: int, col: int) -> list[tuple[str, float]]:
        li = self.layers.index(layer)
        return [(self.vocabulary[str(int(t))], float(p))
                for t, p in zip(self.top_ids[li, row, col], self.top_probs[li, row, col])]


def word_token(tokenizer: Any, word: str) -> tuple[int, str]:
    """The first token of `word` as it appears after a space in running text (and its text)."""
    if not word.strip():
        raise InputError("empty --word: name the object whose probability to map, e.g. dog")
    ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    # SentencePiece tokenizers may give a lone "▁" first; skip a token that decodes to whitespace.
    ids = [i for i in ids if tokenizer.decode([i]).strip()] or ids
    if not ids:
        raise InputError(f"{word!r} tokenizes to nothing")
    return int(ids[0]), tokenizer.decode([ids[0]])


def logit_lens(vlm: Any, image: Any, prompt: str, *, word: str | None = None, layers: Any = "all",
               top_k: int = 5) -> LensResult:
    """Logit lens over the image tokens of one prefill (see the module docstring)."""
    start = time.perf_counter()
    adapter = vlm.adapter
    layer_ids = check_range(parse_indices(layers, "layer"), adapter.num_layers, "layer")
    if top_k < 1:
        raise InputError("top_k must be at least 1")
    tokenizer = adapter.tokenizer
    word_id, word_text = word_token(tokenizer, word) if word is not None else (None, None)
    batch = vlm.encode([load_image(image)], [prompt])
    inputs = build_inputs(vlm, batch, [])
    grid, positions = _grid_positions(inputs)
    norm, unembed = _final_norm(vlm), vlm.model.get_output_embeddings()
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            kept[layer] = _layer_output(output)[0, positions].detach()
        return hook

    decoder_layers = adapter.decoder_layers()
    handles = [decoder_layers[layer].register_forward_hook(keep(layer)) for layer in layer_ids]
    with _hooks(handles), torch.no_grad():
        vlm.model(input_ids=inputs.batch.input_ids, attention_mask=inputs.batch.attention_mask,
                  position_ids=inputs.positions, **inputs.batch.model_inputs, use_cache=False,
                  logits_to_keep=1, return_dict=True)
    shape = (len(layer_ids), grid.height, grid.width)
    top_k = min(top_k, unembed.out_features)
    top_ids = np.zeros((*shape, top_k), dtype=np.int64)
    top_probs = np.zeros((*shape, top_k), dtype=np.float32)
    word_probs = np.zeros(shape, dtype=np.float32)
    with torch.no_grad():
        for li, layer in enumerate(layer_ids):  # one layer at a time: tokens × vocabulary floats at most
            probs = torch.softmax(unembed(norm(kept.pop(layer))).double(), dim=-1)
            values, ids = probs.topk(top_k, dim=-1)
            top_ids[li] = ids.cpu().numpy().reshape(*shape[1:], top_k)
            top_probs[li] = values.float().cpu().numpy().reshape(*shape[1:], top_k)
            if word_id is not None:
                word_probs[li] = probs[:, word_id].float().cpu().numpy().reshape(shape[1:])
    vocabulary = {str(i): tokenizer.decode([i]) for i in np.unique(top_ids).tolist()}
    params = {"layers": layer_ids, "top_k": top_k, "word": word}
    return LensResult(layers=layer_ids, grid=grid, word=word, word_token_id=word_id, word_token=word_text,
                      vocabulary=vocabulary, prompt=prompt, model_id=vlm.model_id, top_ids=top_ids,
                      top_probs=top_probs, word_probs=word_probs, params=params,
                      provenance=run_provenance(vlm, wall_seconds=time.perf_counter() - start))


def _final_norm(vlm: Any) -> torch.nn.Module:
    norm = getattr(vlm.adapter.decoder(), "norm", None)
    if norm is None:
        raise UnsupportedModelError(f"cannot find the final norm of {type(vlm.model).__name__}'s decoder")
    return norm


# --- head ablation ------------------------------------------------------------------------------------------
@dataclass
class AblationResult(_SavedResult):
    """Head ablation. `effects` [len(heads)]: answer log-probability with the head ablated minus without;
    `ranking`: indices into `heads`, largest drop first; `joint_effect`: all `heads` ablated together."""

    kind: ClassVar[str] = "ablate"
    npz: ClassVar[str] = "ablate.npz"
    arrays: ClassVar[tuple[str, ...]] = ("effects",)

    heads: list[list[int]]  # (layer, head) pairs
    mode: str
    answer: str
    answer_ids: list[int]
    logprob: float
    joint_effect: float | None
    ranking: list[int]
    prompt: str
    model_id: str
    effects: np.ndarray
    grid: ImageGrid | None = None
    params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def top(self, n: int = 10) -> list[tuple[int, int, float]]:
        """The `n` heads whose ablation lowers the answer's log-probability most: (layer, head, effect)."""
        return [(*self.heads[i], float(self.effects[i])) for i in self.ranking[:n]]


def _o_proj(layer: torch.nn.Module) -> torch.nn.Linear:
    attn = getattr(layer, "self_attn", None)
    proj = getattr(attn, "o_proj", None)
    if not isinstance(proj, torch.nn.Linear):
        raise UnsupportedModelError(f"{type(layer).__name__} has no self_attn.o_proj: head ablation needs one")
    return proj


@contextlib.contextmanager
def ablated(vlm: Any, heads: Sequence[Sequence[int]], mode: str = "zero",
            means: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
    """Within the block, each (layer, head) of `heads` is ablated in every forward (hooks undone on exit).

    Mean ablation needs `means` (`head_means`): per layer the o_proj input averaged over the positions of the
    unablated run, so a head's replacement does not depend on which other heads are ablated with it."""
    if mode not in ABLATION_MODES:
        raise InputError(f"unknown ablation mode {mode!r}: use {', '.join(ABLATION_MODES)}")
    adapter = vlm.adapter
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(adapter.check_layer(int(layer)), []).append(adapter.check_head(int(head)))
    if mode == "mean" and (means is None or not set(by_layer) <= set(means)):
        raise InputError("mean ablation needs the heads' means of the unablated run: use head_means(...)")
    layers = adapter.decoder_layers()

    def pre_hook(layer: int, head_ids: list[int]) -> Any:
        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            size = x.shape[-1] // adapter.num_heads
            for h in head_ids:
                part = x[..., h * size:(h + 1) * size]
                if mode == "zero":
                    part.zero_()
                else:
                    part.copy_(means[layer][h * size:(h + 1) * size].to(x.dtype).expand_as(part))
            return (x, *args[1:])
        return hook

    handles = [_o_proj(layers[layer]).register_forward_pre_hook(pre_hook(layer, ids))
               for layer, ids in by_layer.items()]
    with _hooks(handles):
        yield


def head_means(vlm: Any, inputs: FlowInputs, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per layer, the input of o_proj (all heads' outputs) averaged over the positions of one unablated forward."""
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            kept[layer] = args[0][0].detach().mean(dim=0)
        return hook

    decoder_layers = vlm.adapter.decoder_layers()
    handles = [_o_proj(decoder_layers[layer]).register_forward_pre_hook(keep(layer)) for layer in set(layers)]
    with _hooks(handles):
        answer_logprob(vlm, inputs)
    return kept


def parse_heads(heads: Any, layers: Any, adapter: Any) -> list[list[int]]:
    """Heads to ablate: a list of (layer, head) pairs, or every head of `heads` ("all", "0-3") in `layers`."""
    if isinstance(heads, list | tuple) and heads and isinstance(heads[0], list | tuple):
        return [[adapter.check_layer(int(layer)), adapter.check_head(int(head))] for layer, head in heads]
    layer_ids = check_range(parse_indices(layers, "layer"), adapter.num_layers, "layer")
    head_ids = check_range(parse_indices(heads, "head"), adapter.num_heads, "head")
    return [[layer, head] for layer in layer_ids for head in head_ids]


def ablate_heads(vlm: Any, image: Any, prompt: str, *, answer: str | None = None, heads: Any = "all",
                 layers: Any = "all", mode: str = "zero", joint: bool = True,
                 max_new_tokens: int = 32) -> AblationResult:
    """Ablate each head in turn (and all together when `joint`); see the module docstring."""
    start = time.perf_counter()
    if mode not in ABLATION_MODES:
        raise InputError(f"unknown ablation mode {mode!r}: use {', '.join(ABLATION_MODES)}")
    pairs = parse_heads(heads, layers, vlm.adapter)
    if not pairs:
        raise InputError("no heads to ablate")
    inputs, answer_text = _teacher_forced(vlm, image, prompt, answer, max_new_tokens)
    base = answer_logprob(vlm, inputs)
    means = head_means(vlm, inputs, [layer for layer, _ in pairs]) if mode == "mean" else None
    effects = []
    for pair in pairs:
        with ablated(vlm, [pair], mode, means):
            effects.append(answer_logprob(vlm, inputs) - base)
    joint_effect = None
    if joint and len(pairs) > 1:
        with ablated(vlm, pairs, mode, means):
            joint_effect = answer_logprob(vlm, inputs) - base
    ranking = [int(i) for i in np.argsort(np.asarray(effects), kind="stable")]
    params = {"mode": mode, "heads": pairs, "joint": joint, "max_new_tokens": max_new_tokens,
              "answer_given": answer is not None}
    return AblationResult(heads=pairs, mode=mode, answer=answer_text, answer_ids=inputs.answer_ids, logprob=base,
                          joint_effect=joint_effect, ranking=ranking, prompt=prompt, model_id=vlm.model_id,
                          effects=np.asarray(effects, dtype=np.float64), params=params,
                          provenance=run_provenance(vlm, wall_seconds=time.perf_counter() - start))


# --- activation patching ------------------------------------------------------------------------------------
@dataclass
class PatchResult(_SavedResult):
    """Activation patching clean → corrupted. `layer_restoration` [layers]: all image tokens patched at once;
    `position_restoration` [layers, grid_h, grid_w] one grid token at a time (positions="each", else empty)."""

    kind: ClassVar[str] = "patch"
    npz: ClassVar[str] = "patch.npz"
    arrays: ClassVar[tuple[str, ...]] = ("layer_logprob", "layer_restoration", "position_logprob",
                                         "position_restoration")

    layers: list[int]
    grid: ImageGrid
    answer: str
    answer_ids: list[int]
    logprob_clean: float
    logprob_corrupt: float
    positions: str
    prompt: str
    model_id: str
    layer_logprob: np.ndarray
    layer_restoration: np.ndarray
    position_logprob: np.ndarray
    position_restoration: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def patched(vlm: Any, layer: int, positions: Any, source: torch.Tensor) -> Iterator[None]:
    """Within the block, the residual stream entering decoder `layer` takes `source`'s rows at `positions`."""
    index = torch.as_tensor(np.asarray(positions), dtype=torch.long)

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden.clone()
        hidden[0, index.to(hidden.device)] = source[index.to(source.device)].to(hidden.device, hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = vlm.adapter.decoder_layers()[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    with _hooks([handle]):
        yield


def residual_inputs(vlm: Any, inputs: FlowInputs, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The residual stream [T, d] entering each of `layers` in one forward of `inputs`."""
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            kept[layer] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()
        return hook

    decoder_layers = vlm.adapter.decoder_layers()
    handles = [decoder_layers[layer].register_forward_pre_hook(keep(layer), with_kwargs=True) for layer in layers]
    with _hooks(handles):
        answer_logprob(vlm, inputs)
    return kept


def _restoration(value: float, clean: float, corrupt: float) -> float:
    gap = clean - corrupt
    return (value - corrupt) / gap if gap != 0 else float("nan")


def patch_activations(vlm: Any, clean_image: Any, corrupt_image: Any, prompt: str, *, answer: str | None = None,
                      layers: Any = "all", positions: str = "image", max_new_tokens: int = 32) -> PatchResult:
    """Patch the clean run's residual stream into the corrupted run (see the module docstring).

    `positions`: "image" (every image token of the span at once, one forward per layer) or "each" (also one
    forward per layer and grid token, laid out as a map)."""
    start = time.perf_counter()
    if positions not in PATCH_POSITIONS:
        raise InputError(f"unknown positions {positions!r}: use {', '.join(PATCH_POSITIONS)}")
    layer_ids = check_range(parse_indices(layers, "layer"), vlm.adapter.num_layers, "layer")
    clean, answer_text = _teacher_forced(vlm, clean_image, prompt, answer, max_new_tokens)
    corrupt_batch = vlm.encode([load_image(corrupt_image)], [prompt])
    corrupt = build_inputs(vlm, corrupt_batch, clean.answer_ids)
    if not torch.equal(clean.batch.input_ids, corrupt.batch.input_ids):
        raise InputError("the corrupted image gives another number of image tokens than the clean one: give it "
                         "the clean image's size")
    lp_clean, lp_corrupt = answer_logprob(vlm, clean), answer_logprob(vlm, corrupt)
    sources = residual_inputs(vlm, clean, layer_ids)
    span = np.arange(*clean.image_span)
    grid, grid_positions = _grid_positions(clean)
    layer_lp = np.zeros(len(layer_ids))
    each = positions == "each"
    position_lp = np.zeros((len(layer_ids), grid.height, grid.width) if each else (0, 0, 0))
    for li, layer in enumerate(layer_ids):
        with patched(vlm, layer, span, sources[layer]):
            layer_lp[li] = answer_logprob(vlm, corrupt)
        if each:
            for k, pos in enumerate(grid_positions):
                with patched(vlm, layer, [pos], sources[layer]):
                    position_lp[li].flat[k] = answer_logprob(vlm, corrupt)
    restore = np.vectorize(lambda v: _restoration(v, lp_clean, lp_corrupt), otypes=[float])
    params = {"layers": layer_ids, "positions": positions, "max_new_tokens": max_new_tokens,
              "answer_given": answer is not None}
    return PatchResult(layers=layer_ids, grid=grid, answer=answer_text, answer_ids=clean.answer_ids,
                       logprob_clean=lp_clean, logprob_corrupt=lp_corrupt, positions=positions, prompt=prompt,
                       model_id=vlm.model_id, layer_logprob=layer_lp,
                       layer_restoration=restore(layer_lp) if layer_lp.size else layer_lp,
                       position_logprob=position_lp,
                       position_restoration=restore(position_lp) if position_lp.size else position_lp,
                       params=params, provenance=run_provenance(vlm, wall_seconds=time.perf_counter() - start))
