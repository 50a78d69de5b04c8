"""Information flow between token groups, per decoder layer: attention shares, saliency flows and LLaVA-CAM.

Token groups of the teacher-forced sequence prompt + answer (positions, 0-based; P = prompt length):
prefix (before the image: BOS, system, "USER:"), image (the image-token span; LLaVA-NeXT newline tokens
included), instruction (after the image to the end of the prompt), output (the answer tokens P .. P+A-1).

1. **Attention shares** (R2R §3.3): for every answer token k, the attention row of the query that predicted it
   (position P-1+k, the same row the attention maps call step k) summed over each group's key columns, then
   averaged over heads and answer tokens. The four shares sum to 1 per layer (rows are softmax rows).
2. **Saliency flows** ("label words are anchors"): I_l = |Σ_h A_h ⊙ ∂L/∂A_h| with L = Σ_k -log p(a_k | ...),
   the negative log-likelihood of the answer (teacher forcing). For groups src → dst,
   C = {(i, j): i ∈ dst, j ∈ src, j < i} (diagonal excluded), mean S = Σ_C I(i, j) / |C| ("saliency"), total
   Σ_C I ("saliency_total") and its share of Σ over all j < i ("saliency_share"). "g->target" uses as
   destination rows the positions that predict answer tokens (P-1 .. P+A-2), the analogue of S_pq.
   Note: the last answer token's own row predicts nothing inside L, so its I row is 0 (it is in "output").
3. **LLaVA-CAM** per layer (R2R §3.1-3.2): target z = Σ_k logit(P-1+k, a_k); F = the layer's output
   (residual stream) at the image-grid positions, G = ∂z/∂F; "described" (default, the paper): α = mean over
   image positions of G, heat = ReLU(Σ_c α_c F_c). "coded" (the released script, minus its indexing bugs):
   F = the output of `post_attention_layernorm`, α = mean over positions of ReLU(G), heat = ReLU(mean_c α_c F_c),
   max-normalised and thresholded at 0.5. Optional SmoothGrad (noise on the pixel values): the heat is the mean
   over the clean input and `smooth_samples` noisy copies (1 + smooth_samples CAM passes).

Memory, layer by layer: the saliency needs each layer's full [heads, T, T] probabilities and their gradient.
Layers are processed in chunks of `chunk_size`: one forward + backward per chunk, with the engine's eager path
(and `retain_grad`) only on that chunk's layers; all other layers run SDPA, parameters are frozen and the
autograd graph starts at the chunk's first layer (its input hidden states are detached there), so only the
chunk's probabilities (plus the activations from that layer on) are alive. Each layer is reduced to group
sums right after its backward. Trade-off: cost = ceil(layers / chunk_size) forward+backward passes (+1 for the
CAM, +1 generation when no answer is given); peak memory ≈ chunk_size × (≈ 6 × heads × T² bytes in fp16).
LLaVA-1.5-7B, T ≈ 664: ≈ 170 MB per layer, so chunk_size 8 (≈ 1.4 GB) fits easily on an 80 GB GPU.
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

from vlmscope.attention.engine import AttentionPlan, attention_plan, decoder_attention_modules
from vlmscope.decoding import DECODINGS
from vlmscope.errors import InputError
from vlmscope.explain import render
from vlmscope.explain.select import check_range, parse_indices
from vlmscope.images import load_image
from vlmscope.models.adapters import Batch, ImageGrid
from vlmscope.results import json_safe, prepare_output_dir, read_run, run_provenance, write_run

GROUPS = ("prefix", "image", "instruction", "output")
MAIN_FLOWS = ("image->instruction", "image->output", "instruction->output", "output->output")
CAM_VARIANTS = ("described", "coded")


@dataclass
class FlowInputs:
    """The teacher-forced sequence and its group layout."""

    batch: Batch  # prompt + answer, batch size 1
    positions: torch.Tensor
    prompt_len: int
    answer_ids: list[int]
    group_of: np.ndarray  # [T] index into GROUPS
    grid_positions: np.ndarray  # sequence positions of the image-grid tokens (newlines left out)
    grids: list[ImageGrid]
    image_span: tuple[int, int]

    @property
    def length(self) -> int:
        return int(self.batch.input_ids.shape[1])


@dataclass
class FlowResult:
    """Per-layer attention shares, saliency flows and CAMs of one teacher-forced answer (see the module doc).

    Saved as run.json (kind "flow", every number) + flows.png + cam*.png; `FlowResult.load(dir)` reads it back.
    """

    kind: ClassVar[str] = "flow"
    layers: list[int]
    attention_shares: dict[str, list[float]]
    attention_shares_per_token: dict[str, list[list[float]]]
    saliency: dict[str, list[float]]
    saliency_total: dict[str, list[float]]
    saliency_share: dict[str, list[float]]
    cam: dict[str, Any]
    groups: dict[str, list[int]]  # group → [first, last + 1) (image: the span)
    answer: str
    answer_ids: list[int]
    answer_tokens: list[str]
    prompt_ids: list[int]
    prompt: str
    model_id: str
    image: Any = None
    grids: list[ImageGrid] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        answer = self.answer if len(self.answer) <= 40 else self.answer[:39] + "…"
        cam = self.cam.get("variant") if self.cam else None
        return (f"FlowResult(model={self.model_id!r}, answer={answer!r}, layers={len(self.layers)}, "
                f"answer_tokens={len(self.answer_ids)}, cam={cam!r})")

    def cam_maps(self, grid: str | None = None, normalized: bool = True) -> np.ndarray:
        """[layers, grid_h, grid_w] CAM heat maps of one grid."""
        name = grid or self.grids[0].name
        return np.asarray(self.cam["grids"][name]["normalized" if normalized else "raw"], dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        return json_safe({
            "kind": self.kind, "provenance": self.provenance,
            "model": self.model_id, "prompt": self.prompt, "answer": self.answer, "answer_ids": self.answer_ids,
            "answer_tokens": self.answer_tokens, "prompt_ids": self.prompt_ids, "groups": self.groups,
            "layers": self.layers,
            "attention_shares": self.attention_shares,
            "attention_shares_per_token": self.attention_shares_per_token,
            "saliency": self.saliency, "saliency_total": self.saliency_total,
            "saliency_share": self.saliency_share, "cam": self.cam,
            "grids": [{"name": g.name, "height": g.height, "width": g.width, "region": list(g.region)}
                      for g in self.grids],
            "definitions": {
                "attention_shares": "mean over heads and answer tokens of the predicting row's attention "
                                    "summed over each group's keys",
                "saliency": "I_l = |sum_h A * dL/dA|, L = answer NLL; mean of I over pairs (i in dst, j in src, "
                            "j < i); 'target' = rows P-1..P+A-2 that predict the answer tokens",
                "saliency_total": "sum of I over the same pairs",
                "saliency_share": "saliency_total / sum of I over all pairs j < i",
            },
            "params": self.params, "runtime": self.runtime,
        })

    def plot_flows(self) -> Any:
        fig = render.new_figure(11.0, 3.8)
        ax = fig.add_subplot(1, 2, 1)
        for name, values in self.attention_shares.items():
            ax.plot(self.layers, values, marker="o", markersize=3, label=name)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of the answer tokens' attention")
        ax.set_title("attention shares", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        ax = fig.add_subplot(1, 2, 2)
        for name in MAIN_FLOWS:
            ax.plot(self.layers, self.saliency[name], marker="o", markersize=3, label=name)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean saliency per token pair")
        ax.set_title("saliency flows |Σ_h A ⊙ ∂L/∂A|", fontsize=10)
        if all(v > 0 for n in MAIN_FLOWS for v in self.saliency[n]):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        from matplotlib.ticker import MaxNLocator

        for axis in fig.axes:
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        return fig

    def plot_cam(self, grid: str | None = None, columns: int = 8) -> Any:
        if self.image is None:
            raise InputError("this result has no image to draw the CAM on")
        info = self.grids[0] if grid is None else next(g for g in self.grids if g.name == grid)
        maps = self.cam_maps(info.name)
        limits = render.color_limits(list(maps), "per-map")
        return render.overlay_grid(self.image, list(maps), info.region, [f"L{layer}" for layer in self.layers],
                                   limits, columns=columns,
                                   suptitle=f"LLaVA-CAM ({self.cam['variant']}) for {self.answer!r}"[:120])

    def save(self, out_dir: str | Path) -> dict[str, str]:
        """Write run.json, flows.png and (with an image and a CAM) cam*.png; returns the paths by name."""
        out = prepare_output_dir(out_dir, self.kind, ("flows.png", "cam*.png", "flow.json"))  # flow.json: older layout
        written = {"run": str(write_run(out, self.kind, self.to_json()))}
        self.plot_flows().savefig(out / "flows.png")
        written["flows"] = str(out / "flows.png")
        if self.image is not None and self.cam.get("grids"):
            for grid in self.grids:
                suffix = "" if len(self.grids) == 1 else f"_{grid.name}"
                self.plot_cam(grid.name).savefig(out / f"cam{suffix}.png")
                written[f"cam{suffix}"] = str(out / f"cam{suffix}.png")
        return written

    @classmethod
    def load(cls, out_dir: str | Path, image: Any = None) -> FlowResult:
        """Read a saved flow back from its run.json; pass the image again to plot the CAM."""
        run = read_run(out_dir, cls.kind)
        grids = [ImageGrid(g["name"], 0, g["height"], g["width"], g["width"], tuple(g["region"]))
                 for g in run.get("grids", [])]
        return cls(
            layers=run["layers"], attention_shares=run["attention_shares"],
            attention_shares_per_token=run["attention_shares_per_token"], saliency=run["saliency"],
            saliency_total=run["saliency_total"], saliency_share=run["saliency_share"], cam=run["cam"],
            groups=run["groups"], answer=run["answer"], answer_ids=run["answer_ids"],
            answer_tokens=run["answer_tokens"], prompt_ids=run["prompt_ids"], prompt=run["prompt"],
            model_id=run["model"], image=load_image(image) if image is not None else None, grids=grids,
            params=run["params"], runtime=run["runtime"], provenance=run["provenance"],
        )


# --- inputs -------------------------------------------------------------------------------------------------
def build_inputs(vlm: Any, batch: Batch, answer_ids: Sequence[int]) -> FlowInputs:
    """Append the answer to the (single-row) prompt and lay out the token groups."""
    adapter = vlm.adapter
    device = batch.input_ids.device
    prompt_len = int(batch.input_ids.shape[1])
    answer = torch.tensor([list(answer_ids)], dtype=batch.input_ids.dtype, device=device)
    input_ids = torch.cat([batch.input_ids, answer], dim=1)
    ones = torch.ones_like(answer, dtype=batch.attention_mask.dtype)
    attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
    image_mask = torch.cat([batch.image_mask, torch.zeros_like(answer, dtype=torch.bool)], dim=1)
    model_inputs = {}
    for key, value in batch.model_inputs.items():
        if isinstance(value, torch.Tensor) and value.shape == batch.input_ids.shape:
            # Per-token side inputs (Qwen's mm_token_type_ids): answer tokens are text (0).
            value = torch.cat([value, torch.zeros_like(answer, dtype=value.dtype)], dim=1)
        model_inputs[key] = value
    full = Batch(input_ids, attention_mask, model_inputs, image_mask, batch.image_sizes, batch.prompts)
    start, end = adapter.image_span(batch, 0)
    group_of = np.full(input_ids.shape[1], GROUPS.index("instruction"), dtype=np.int64)
    group_of[:start] = GROUPS.index("prefix")
    group_of[start:end] = GROUPS.index("image")
    group_of[prompt_len:] = GROUPS.index("output")
    grids = adapter.image_grids(batch, 0)
    grid_positions = start + np.concatenate([g.indices().ravel() for g in grids])
    return FlowInputs(full, adapter.position_ids(full), prompt_len, list(answer_ids), group_of,
                      grid_positions, grids, (start, end))


def _answer_ids(vlm: Any, batch: Batch, answer: str | None, max_new_tokens: int) -> tuple[list[int], str]:
    tokenizer = vlm.adapter.tokenizer
    if answer is None:
        result = vlm.generate_batch(batch, max_new_tokens, DECODINGS.create("greedy"))[0]
        ids = list(result.token_ids)
        eos = _eos_ids(vlm)
        if ids and ids[-1] in eos:
            ids = ids[:-1]  # the answer is its text; a given --answer has no EOS either
        if not ids:
            raise InputError("the model generated no answer tokens: pass --answer to explain a given answer")
        return ids, tokenizer.decode(ids, skip_special_tokens=True).strip()
    if not answer.strip():
        raise InputError("empty answer: pass the answer text to explain, or omit --answer to generate one")
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"the answer {answer!r} tokenizes to nothing: pass a non-empty answer")
    return list(ids), answer


def _eos_ids(vlm: Any) -> set[int]:
    return set(vlm.adapter.eos_token_ids())


# --- forwards -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients: the graph then only spans what depends on the detached entry point."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def grad_entry(layer: torch.nn.Module) -> Iterator[None]:
    """Detach the hidden states entering `layer` and make them require grad: backward stops there."""

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            args = (args[0].detach().requires_grad_(True), *args[1:])
        else:
            kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _forward_logits(model: Any, inputs: FlowInputs, model_inputs: dict[str, Any] | None = None) -> torch.Tensor:
    """Logits [A, V] at the positions P-1 .. P+A-2 that predict the answer tokens."""
    batch = inputs.batch
    answer_len = len(inputs.answer_ids)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=inputs.positions,
                **(model_inputs if model_inputs is not None else batch.model_inputs), use_cache=False,
                logits_to_keep=answer_len + 1, return_dict=True)
    return out.logits[0, :answer_len].float()


def _answer_nll(logits: torch.Tensor, answer_ids: Sequence[int]) -> torch.Tensor:
    target = torch.tensor(list(answer_ids), device=logits.device)
    return -torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum()


def _group_reductions(saliency: np.ndarray, inputs: FlowInputs) -> dict[str, dict[str, float]]:
    """Mean / total / share of I over (dst row, src column, j < i) pairs for every group pair."""
    length = saliency.shape[0]
    strict = np.tril(np.ones((length, length), dtype=bool), k=-1)
    values = np.where(strict, saliency, 0.0)
    onehot = np.eye(len(GROUPS))[inputs.group_of]  # [T, G]
    target = np.zeros(length)
    target[inputs.prompt_len - 1: inputs.length - 1] = 1.0
    dst = np.concatenate([onehot, target[:, None]], axis=1)  # destinations: the groups, then "target"
    sums = dst.T @ values @ onehot  # [dst, src]
    counts = dst.T @ strict.astype(np.float64) @ onehot
    everything = values.sum()
    out: dict[str, dict[str, float]] = {"mean": {}, "total": {}, "share": {}}
    names = [*GROUPS, "target"]
    for d, dst_name in enumerate(names):
        for s, src_name in enumerate(GROUPS):
            if counts[d, s] == 0:
                continue  # no pair (e.g. output -> image never happens causally)
            key = f"{src_name}->{dst_name}"
            out["mean"][key] = float(sums[d, s] / counts[d, s])
            out["total"][key] = float(sums[d, s])
            out["share"][key] = float(sums[d, s] / everything) if everything > 0 else 0.0
    return out


def _shares(probs: torch.Tensor, inputs: FlowInputs) -> np.ndarray:
    """[answer tokens, groups]: head-mean attention of each predicting row summed over each group's keys."""
    rows = probs[0, :, inputs.prompt_len - 1: inputs.length - 1, :].float().mean(dim=0)  # [A, T]
    onehot = torch.from_numpy(np.eye(len(GROUPS))[inputs.group_of]).to(rows)
    return (rows @ onehot).double().cpu().numpy()


def saliency_pass(vlm: Any, inputs: FlowInputs, layers: Sequence[int]) -> dict[int, dict[str, Any]]:
    """One forward + backward with full eager attention and retained probabilities on `layers` only."""
    model = vlm.model
    plan = AttentionPlan(decoder_attention_modules(model))
    plan.image_mask = inputs.batch.image_mask
    plan.step = 0
    for layer in layers:
        plan.set_retain_grad(layer)
    entry = vlm.adapter.decoder_layers()[min(layers)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(frozen_parameters(model))
        stack.enter_context(grad_entry(entry))
        stack.enter_context(attention_plan(model, plan))
        logits = _forward_logits(model, inputs)
    loss = _answer_nll(logits, inputs.answer_ids)
    probs = []
    for layer in layers:
        retained = plan.layers[layer].retained
        if len(retained) != 1:
            raise RuntimeError(f"layer {layer}: expected one retained attention tensor, got {len(retained)}")
        probs.append(retained[0])
    grads = torch.autograd.grad(loss, probs)
    out = {}
    for layer, p, g in zip(layers, probs, grads):
        saliency = (p.detach().float() * g.float()).sum(dim=1)[0].abs().double().cpu().numpy()  # [T, T]
        out[layer] = {"groups": _group_reductions(saliency, inputs), "shares": _shares(p.detach(), inputs)}
    for layer in layers:
        plan.layers[layer].retained.clear()
    return out


def cam_pass(vlm: Any, inputs: FlowInputs, layers: Sequence[int], variant: str,
             model_inputs: dict[str, Any] | None = None) -> np.ndarray:
    """Heat [layers, image-grid tokens] (after ReLU, before normalisation) from one forward + backward."""
    model = vlm.model
    decoder_layers = vlm.adapter.decoder_layers()
    features: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            features[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(frozen_parameters(model))
        stack.enter_context(grad_entry(decoder_layers[min(layers)]))
        for layer in layers:
            module = decoder_layers[layer]
            if variant == "coded":
                module = getattr(module, "post_attention_layernorm", None)
                if module is None:
                    raise InputError("the coded CAM needs post_attention_layernorm in every decoder layer")
            stack.callback(module.register_forward_hook(keep(layer)).remove)
        logits = _forward_logits(model, inputs, model_inputs)
    target = torch.tensor(inputs.answer_ids, device=logits.device)
    z = logits.gather(1, target[:, None]).sum()  # sum of the answer tokens' logits (no softmax)
    feats = [features[layer] for layer in layers]
    grads = torch.autograd.grad(z, feats)
    positions = torch.as_tensor(inputs.grid_positions, device=feats[0].device)
    heats = []
    for f, g in zip(feats, grads):
        f_img = f[0, positions].float()  # [N, D]
        g_img = g[0, positions].float()
        if variant == "described":
            alpha = g_img.mean(dim=0)  # Grad-CAM pooling
            heat = torch.relu(f_img @ alpha)
        else:
            alpha = torch.relu(g_img).mean(dim=0)  # the script: ReLU before pooling, mean over channels
            heat = torch.relu((f_img * alpha).mean(dim=1))
        heats.append(heat.detach().double().cpu().numpy())
    return np.stack(heats)


# --- the entry point ----------------------------------------------------------------------------------------
def flow(vlm: Any, image: Any, prompt: str, answer: str | None = None, max_new_tokens: int = 32,
         layers: Any = "all", chunk_size: int = 8, cam: str | None = "described", cam_threshold: float | None = None,
         smooth_samples: int = 0, smooth_sigma: float = 0.1, seed: int = 0) -> FlowResult:
    """Attention shares, saliency flows and per-layer CAMs for `answer` (greedy-generated when None).

    `chunk_size`: layers per forward+backward for the saliency (memory ∝ chunk_size, passes ∝ 1/chunk_size).
    `cam`: "described" (paper), "coded" (released script: post_attention_layernorm features, ReLU before pooling,
    threshold 0.5 unless `cam_threshold` says otherwise) or None to skip. `smooth_samples` > 0 averages the
    CAM over the clean input and that many copies with Gaussian noise (std `smooth_sigma`, drawn from a
    generator seeded with `seed`) on the pixel values.
    """
    start = time.perf_counter()
    adapter = vlm.adapter
    layer_ids = sorted(check_range(parse_indices(layers, "layer"), adapter.num_layers, "layer"))
    if chunk_size < 1:
        raise InputError("chunk_size must be at least 1")
    if cam is not None and cam not in CAM_VARIANTS:
        raise InputError(f"unknown CAM variant {cam!r}: use described, coded or none")
    if smooth_samples < 0:
        raise InputError("smooth_samples must be >= 0")
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be at least 1")
    pil = load_image(image)
    batch = vlm.encode([pil], [prompt])
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    answer_ids, answer_text = _answer_ids(vlm, batch, answer, max_new_tokens)
    if answer is None:
        timings["generate_seconds"] = time.perf_counter() - t0
    inputs = build_inputs(vlm, batch, answer_ids)

    # Saliency and attention shares, chunk by chunk.
    t0 = time.perf_counter()
    per_layer: dict[int, dict[str, Any]] = {}
    chunks = [layer_ids[i: i + chunk_size] for i in range(0, len(layer_ids), chunk_size)]
    for chunk in chunks:
        per_layer.update(saliency_pass(vlm, inputs, chunk))
    timings["saliency_seconds"] = time.perf_counter() - t0

    shares = {g: [float(per_layer[layer]["shares"][:, i].mean()) for layer in layer_ids]
              for i, g in enumerate(GROUPS)}
    shares_per_token = {g: [per_layer[layer]["shares"][:, i].tolist() for layer in layer_ids]
                        for i, g in enumerate(GROUPS)}
    keys = list(per_layer[layer_ids[0]]["groups"]["mean"])
    reductions = {kind: {key: [per_layer[layer]["groups"][kind][key] for layer in layer_ids] for key in keys}
                  for kind in ("mean", "total", "share")}

    cam_out: dict[str, Any] = {}
    cam_passes = 0
    if cam is not None:
        t0 = time.perf_counter()
        threshold = cam_threshold if cam_threshold is not None else (0.5 if cam == "coded" else None)
        heat = cam_pass(vlm, inputs, layer_ids, cam)
        cam_passes = 1
        if smooth_samples:
            # SmoothGrad: the clean pass is copy 0 of the average, the noisy copies follow.
            generator = torch.Generator().manual_seed(seed)
            total = heat.copy()
            for _ in range(smooth_samples):
                noisy = dict(inputs.batch.model_inputs)
                pixels = noisy["pixel_values"]
                noise = torch.randn(pixels.shape, generator=generator).to(pixels) * smooth_sigma
                noisy["pixel_values"] = pixels + noise
                total += cam_pass(vlm, inputs, layer_ids, cam, noisy)
            heat = total / (smooth_samples + 1)
            cam_passes += smooth_samples
        peak = heat.max(axis=1, keepdims=True)
        normalized = np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0)
        if threshold is not None:
            normalized = np.where(normalized >= threshold, normalized, 0.0)
        offsets = np.cumsum([0] + [g.height * g.width for g in inputs.grids])
        grids_out = {}
        for grid, lo, hi in zip(inputs.grids, offsets[:-1], offsets[1:]):
            shape = (len(layer_ids), grid.height, grid.width)
            grids_out[grid.name] = {"raw": heat[:, lo:hi].reshape(shape).tolist(),
                                    "normalized": normalized[:, lo:hi].reshape(shape).tolist(),
                                    "region": list(grid.region)}
        cam_out = {"variant": cam, "feature": "layer output" if cam == "described" else "post_attention_layernorm",
                   "target": "sum of the answer tokens' logits", "threshold": threshold,
                   "smooth_samples": smooth_samples, "smooth_sigma": smooth_sigma if smooth_samples else None,
                   "grids": grids_out}
        timings["cam_seconds"] = time.perf_counter() - t0

    start_img, end_img = inputs.image_span
    groups = {"prefix": [0, start_img], "image": [start_img, end_img],
              "instruction": [end_img, inputs.prompt_len], "output": [inputs.prompt_len, inputs.length]}
    tokenizer = adapter.tokenizer
    timings["total_seconds"] = time.perf_counter() - start
    runtime = {**timings, "saliency_passes": len(chunks), "cam_passes": cam_passes,
               "forward_backward_passes": len(chunks) + cam_passes, "sequence_length": inputs.length}
    params = {"answer_given": answer is not None, "max_new_tokens": max_new_tokens, "layers": layer_ids,
              "chunk_size": chunk_size, "cam": cam, "cam_threshold": cam_threshold,
              "smooth_samples": smooth_samples, "smooth_sigma": smooth_sigma if smooth_samples else None,
              "loss": "sum of answer-token negative log-likelihoods"}
    record = run_provenance(vlm, decoding=DECODINGS.create("greedy") if answer is None else None,
                            seed=seed if cam is not None and smooth_samples else None,
                            wall_seconds=timings["total_seconds"])
    return FlowResult(
        layers=layer_ids, attention_shares=shares, attention_shares_per_token=shares_per_token,
        saliency=reductions["mean"], saliency_total=reductions["total"], saliency_share=reductions["share"],
        cam=cam_out, groups=groups, answer=answer_text, answer_ids=answer_ids,
        answer_tokens=[tokenizer.decode([t]) for t in answer_ids],
        prompt_ids=batch.input_ids[0].tolist(), prompt=prompt, model_id=vlm.model_id, image=pil,
        grids=inputs.grids, params=params, runtime=runtime, provenance=record,
    )

