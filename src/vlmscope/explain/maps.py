"""Attention maps: what every generated token attended to in the image, per layer and head.

One greedy generation through the package's own loop with an attention plan that captures, for the selected
layers only, the **last query row** (the query that produced each token) restricted to the **image columns**
and the selected heads. Step 0 is the prefill's last row (the query of the last prompt position, which produced
the first generated token), step k the k-th decode forward. Nothing else is materialised: the other rows of the
prefill and all unselected layers run stock SDPA, so a 7B model never computes `output_attentions` for every
layer (memory: steps × layers × heads × image tokens floats).

The captured rows are laid out on the image grids of the adapter (LLaVA-1.5: 24×24; LLaVA-NeXT: the base view
and the unpadded tile grid, newline tokens left out; Qwen2-VL: the merged patch grid). InstructBLIP's image
tokens are its Q-Former queries: their columns are carried to the ViT patch grid through the Q-Former's
cross-attention (`carry_queries_to_patches`), so its maps are over the image too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vlmscope.attention.engine import AttentionPlan, Capture, decoder_attention_modules
from vlmscope.decoding import DECODINGS
from vlmscope.errors import InputError
from vlmscope.explain import render
from vlmscope.explain.select import AXES, check_range, parse_indices, parse_reduce
from vlmscope.images import load_image
from vlmscope.models.adapters import ImageGrid
from vlmscope.results import prepare_output_dir, read_run, run_provenance, write_run

REDUCE_OPS = ("mean", "max", "sum")


@dataclass
class ExplainResult:
    """Raw per-step/layer/head attention maps over the image grid(s), plus the generation they explain.

    `maps` is float32 `[steps, layers, heads, grid_h, grid_w]` for the first grid; `grid_maps` holds every
    grid by name (LLaVA-NeXT: "base" and "tiles"). `tokens[i]` is the token generated at `steps[i]`.
    `provenance`: versions, model, revision, decoding spec, device, dtype and wall time of the run.
    Saved as attention.npz + run.json (kind "explain") + overlays; `ExplainResult.load(dir)` reads it back.
    """

    kind: ClassVar[str] = "explain"

    grid_maps: dict[str, np.ndarray]
    grids: list[ImageGrid]
    steps: list[int]
    layers: list[int]
    heads: list[int]
    tokens: list[str]
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    prompt: str
    model_id: str
    image: Any = None  # the original PIL image (overlays are drawn on it)
    params: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {list(maps.shape)}" for name, maps in self.grid_maps.items())
        return (f"ExplainResult(model={self.model_id!r}, text={_clip(self.text)!r}, steps={len(self.steps)}, "
                f"layers={_clip(str(self.layers))}, heads={_clip(str(self.heads))}, maps={{{shapes}}})")

    # --- access ---------------------------------------------------------------------------------------
    @property
    def maps(self) -> np.ndarray:
        return self.grid_maps[self.grids[0].name]

    def grid(self, name: str | None) -> tuple[ImageGrid, np.ndarray]:
        if name is None:
            return self.grids[0], self.maps
        for grid in self.grids:
            if grid.name == name:
                return grid, self.grid_maps[name]
        raise InputError(f"no image grid {name!r}: this model has {', '.join(g.name for g in self.grids)}")

    def reduce(self, axes: Any = None, op: str | None = None, grid: str | None = None,
               keepdims: bool = False) -> np.ndarray:
        """Reduce over any of "steps", "layers", "heads" ("none"/"all" or a combination, e.g. "steps,heads").

        `op`: mean (default), max or sum. Without keepdims the reduced axes are dropped, so "layers,heads"
        gives `[steps, grid_h, grid_w]` and "all" gives one `[grid_h, grid_w]` map.
        """
        names = parse_reduce(self.params.get("reduce") if axes is None else axes)
        op = op or self.params.get("reduce_op", "mean")
        if op not in REDUCE_OPS:
            raise InputError(f"unknown reduction op {op!r}: use {', '.join(REDUCE_OPS)}")
        _, maps = self.grid(grid)
        dims = tuple(AXES.index(a) for a in names)
        if not dims:
            return maps.copy()
        fn = {"mean": np.mean, "max": np.max, "sum": np.sum}[op]
        return fn(maps, axis=dims, keepdims=keepdims).astype(np.float32)

    # --- labels ---------------------------------------------------------------------------------------
    def _labels(self, reduced: tuple[str, ...], shape: tuple[int, int, int]) -> list[tuple[str, str]]:
        """(file stem, title) for every map left after reducing `reduced` (keepdims layout)."""
        out = []
        for s, li, h in np.ndindex(*shape):
            stem, title = [], []
            if "steps" not in reduced:
                stem.append(f"s{self.steps[s]:03d}")
                title.append(f"{self.steps[s]}: {render.safe_label(self.tokens[s])}")
            if "layers" not in reduced:
                stem.append(f"l{self.layers[li]:02d}")
                title.append(f"L{self.layers[li]}")
            if "heads" not in reduced:
                stem.append(f"h{self.heads[h]:02d}")
                title.append(f"H{self.heads[h]}")
            out.append(("_".join(stem) or "all", " ".join(title) or "mean over all"))
        return out

    # --- output ---------------------------------------------------------------------------------------
    def plot(self, reduce: Any = None, scale: str | None = None, grid: str | None = None,
             columns: int = 6, max_panels: int = 64) -> Any:
        """A matplotlib Figure with one overlay panel per map left after the reduction (Agg canvas)."""
        if self.image is None:
            raise InputError("this result has no image to draw on (it was loaded without one)")
        names = parse_reduce(self.params.get("reduce") if reduce is None else reduce)
        scale = scale or self.params.get("scale", "shared")
        grid_info, _ = self.grid(grid)
        reduced = self.reduce(names, grid=grid, keepdims=True)
        flat = reduced.reshape(-1, *reduced.shape[3:])
        labels = self._labels(names, reduced.shape[:3])
        if len(flat) > max_panels:
            raise InputError(
                f"{len(flat)} maps are too many for one figure (max {max_panels}): reduce over more axes"
            )
        limits = render.color_limits(list(flat), scale)
        return render.overlay_grid(self.image, list(flat), grid_info.region, [t for _, t in labels], limits,
                                   columns=columns, suptitle=f"{self.prompt!r} → {self.text!r}"[:120])

    def save(self, out_dir: str | Path, reduce: Any = None, scale: str | None = None, overlays: bool = True,
             max_overlays: int = 256) -> dict[str, Any]:
        """Write attention.npz, run.json, one overlay PNG per reduced map and steps.png; returns the paths.

        Files an earlier explain run left in `out_dir` (overlays, figures) are replaced, not mixed in."""
        out = prepare_output_dir(out_dir, self.kind, ("attention.npz", "overlay_*.png", "steps*.png"))
        names = parse_reduce(self.params.get("reduce") if reduce is None else reduce)
        scale = scale or self.params.get("scale", "shared")
        arrays: dict[str, Any] = {"maps": self.maps}
        for grid in self.grids[1:]:
            arrays[f"maps_{grid.name}"] = self.grid_maps[grid.name]
        arrays.update(layers=np.asarray(self.layers, dtype=np.int64), heads=np.asarray(self.heads, dtype=np.int64),
                      steps=np.asarray(self.steps, dtype=np.int64), tokens=np.asarray(self.tokens, dtype=str),
                      grid_names=np.asarray([g.name for g in self.grids], dtype=str))
        np.savez_compressed(out / "attention.npz", **arrays)
        written: dict[str, Any] = {"npz": str(out / "attention.npz"), "overlays": [], "figures": []}
        skipped = 0
        if overlays and self.image is not None:
            for grid in self.grids:
                suffix = "" if len(self.grids) == 1 else f"_{grid.name}"
                reduced = self.reduce(names, grid=grid.name, keepdims=True)
                flat = reduced.reshape(-1, *reduced.shape[3:])
                labels = self._labels(names, reduced.shape[:3])
                limits = render.color_limits(list(flat), scale)
                for i, (heat, (stem, title), (vmin, vmax)) in enumerate(zip(flat, labels, limits)):
                    if i >= max_overlays:
                        skipped = len(flat) - max_overlays
                        break
                    path = render.save_overlay(out / f"overlay_{stem}{suffix}.png", self.image, heat,
                                               grid.region, vmin, vmax, title)
                    written["overlays"].append(str(path))
                # Every step titled by its token (mean over the selected layers and heads).
                fig = self.plot(reduce=("layers", "heads"), scale=scale, grid=grid.name,
                                max_panels=max(64, len(self.steps)))
                fig.savefig(out / f"steps{suffix}.png")
                written["figures"].append(str(out / f"steps{suffix}.png"))
        run = self.to_json()
        run["output"] = {"reduce": list(names) or "none", "scale": scale, "overlays_skipped": skipped,
                         "files": written}
        written["run"] = str(write_run(out, self.kind, run))
        return written

    @classmethod
    def load(cls, out_dir: str | Path, image: Any = None) -> ExplainResult:
        """Read a saved result back (attention.npz + run.json); pass the image again to plot it."""
        out = Path(out_dir)
        run = read_run(out, cls.kind)
        if not (out / "attention.npz").is_file():
            raise InputError(f"{out} has no attention.npz: point to a directory written by explain")
        with np.load(out / "attention.npz") as data:
            grids = [ImageGrid(g["name"], 0, g["height"], g["width"], g["width"], tuple(g["region"]))
                     for g in run["grids"]]
            grid_maps = {grids[0].name: data["maps"]}
            for grid in grids[1:]:
                grid_maps[grid.name] = data[f"maps_{grid.name}"]
            steps, layers, heads = (data[k].tolist() for k in ("steps", "layers", "heads"))
            tokens = [str(t) for t in data["tokens"]]
        return cls(
            grid_maps=grid_maps, grids=grids, steps=steps, layers=layers, heads=heads, tokens=tokens,
            text=run["text"], token_ids=run["token_ids"], prompt_ids=run["prompt_ids"], prompt=run["prompt"],
            model_id=run["model"], image=load_image(image) if image is not None else None, params=run["params"],
            runtime=run["runtime"], provenance=run["provenance"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "provenance": self.provenance,
            "model": self.model_id,
            "prompt": self.prompt,
            "text": self.text,
            "prompt_ids": self.prompt_ids,
            "token_ids": self.token_ids,
            "steps": self.steps,
            "tokens": self.tokens,
            "layers": self.layers,
            "heads": self.heads,
            "grids": [{"name": g.name, "height": g.height, "width": g.width, "region": list(g.region)}
                      for g in self.grids],
            "maps_shape": {g.name: list(self.grid_maps[g.name].shape) for g in self.grids},
            "params": self.params,
            "runtime": self.runtime,
        }


def explain(vlm: Any, image: Any, prompt: str, steps: Any = "all", layers: Any = "all", heads: Any = "all",
            reduce: Any = "layers,heads", reduce_op: str = "mean", scale: str = "shared",
            max_new_tokens: int = 32) -> ExplainResult:
    """Greedy-generate an answer and capture every generated token's attention to the image tokens.

    `steps`: "all" or indices of generated tokens (0 = the first); `layers`/`heads`: "all", 14, "0-3",
    "13,24" or lists. `reduce`/`reduce_op`/`scale` are the defaults for `.reduce()`, `.save()` and `.plot()`;
    the stored maps are always raw.
    """
    start = time.perf_counter()
    adapter = vlm.adapter
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be at least 1")
    layer_ids = check_range(parse_indices(layers, "layer"), adapter.num_layers, "layer")
    head_ids = check_range(parse_indices(heads, "head"), adapter.num_heads, "head")
    step_ids = parse_indices(steps, "step")
    for s in step_ids or []:
        if not 0 <= s < max_new_tokens:
            raise InputError(f"step {s} is out of range: with --max-new-tokens {max_new_tokens} valid steps are "
                             f"0..{max_new_tokens - 1}")
    names = parse_reduce(reduce)
    if reduce_op not in REDUCE_OPS:
        raise InputError(f"unknown reduction op {reduce_op!r}: use {', '.join(REDUCE_OPS)}")
    render.color_limits([], scale)  # validates the name before the expensive part

    pil = load_image(image)
    batch = vlm.encode([pil], [prompt])
    grids = adapter.image_grids(batch, 0)
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    every_head = head_ids == list(range(adapter.num_heads))
    captures = [plan.add_capture(layer, Capture(heads=None if every_head else head_ids, rows="last",
                                                columns="image", to_cpu=True))
                for layer in layer_ids]
    gen_start = time.perf_counter()
    greedy = DECODINGS.create("greedy")
    result = vlm.generate_batch(batch, max_new_tokens, greedy, capture_plan=plan)[0]
    gen_seconds = time.perf_counter() - gen_start

    generated = len(result.token_ids)
    for capture in captures:
        if len(capture.records) != generated:
            raise RuntimeError(f"captured {len(capture.records)} forwards for {generated} generated tokens")
    # [steps, layers, heads, image tokens]: record k is [1, heads, 1, image] for the forward of step k.
    raw = torch.stack([torch.cat(c.records, dim=0)[:, :, 0, :] for c in captures], dim=1).float().numpy()
    if step_ids is None:
        step_ids = list(range(generated))
    for s in step_ids:
        if s >= generated:
            raise InputError(f"step {s} is beyond the {generated} generated tokens: valid steps are "
                             f"0..{generated - 1}")
    raw = raw[step_ids]
    if hasattr(adapter, "query_patch_attention"):
        # Q-Former models: the captured columns are the queries; carry them to the ViT patches.
        raw = carry_queries_to_patches(raw, adapter.query_patch_attention(batch)[0].cpu().numpy())
        grids = [adapter.patch_grid()]
    grid_maps = {grid.name: np.ascontiguousarray(grid.take(raw), dtype=np.float32) for grid in grids}
    tokenizer = adapter.tokenizer
    all_tokens = [tokenizer.decode([t]) for t in result.token_ids]
    params = {"steps": step_ids if steps not in (None, "all") else "all", "layers": layer_ids,
              "heads": head_ids, "reduce": list(names) or "none", "reduce_op": reduce_op, "scale": scale,
              "max_new_tokens": max_new_tokens, "decoding": "greedy"}
    total_seconds = time.perf_counter() - start
    runtime = {"generate_seconds": gen_seconds, "total_seconds": total_seconds, "eager_calls": plan.calls}
    return ExplainResult(
        grid_maps=grid_maps, grids=grids, steps=step_ids, layers=layer_ids, heads=head_ids,
        tokens=[all_tokens[s] for s in step_ids], text=result.text, token_ids=result.token_ids,
        prompt_ids=result.prompt_ids, prompt=prompt, model_id=vlm.model_id, image=pil, params=params,
        runtime=runtime, provenance=run_provenance(vlm, decoding=greedy, wall_seconds=total_seconds),
    )


def carry_queries_to_patches(query_maps: np.ndarray, query_patch: np.ndarray) -> np.ndarray:
    """Carry attention to Q-Former queries onto the ViT patches the queries read (InstructBLIP, BLIP-2).

    `query_maps` is [..., queries] (a generated token's attention to each query token), `query_patch`
    [queries, patches] (each query's cross-attention to the patches, mean over the Q-Former's cross-attention
    layers and heads, CLS dropped). Patch p gets Σ_q query_maps[..., q] · query_patch[q, p]: the attention a
    token paid to the queries, split over the patches in the proportions each query attended to them. The
    result keeps the attention mass to the queries, less the queries' share on CLS.
    """
    if query_maps.shape[-1] != query_patch.shape[0]:
        raise InputError(f"{query_maps.shape[-1]} query columns but a cross-attention matrix for "
                         f"{query_patch.shape[0]} queries")
    return np.einsum("...q,qp->...p", query_maps, query_patch).astype(np.float32)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
