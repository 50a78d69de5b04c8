"""Localization heads: the few heads whose last-prompt-token attention lands on one compact image region.

Selection as in Kang et al. 2025 ("Your Large Vision-Language Model Only Needs A Few Attention Heads for
Visual Grounding"), per image:

1. attention sum S = Σ over image tokens of the last prompt token's attention, per (layer, head); threshold at
   the "chord" elbow of the ascending sorted sums (the point farthest from the line joining the first and last
   point, in raw (index, sum) coordinates); heads with S ≥ threshold are kept;
2. spatial entropy of each kept head's map A over the image grid: B = ReLU(A − 2·mean(A)), binarised at
   B > 0.001, 8-connected components k, p_k = Σ_{x∈k} B(x) / Σ_x B(x), H = −Σ_k p_k log p_k (H = +inf when
   B ≡ 0 and, unlike the reference code's 0, also when no pixel passes the binarisation);
3. heads whose raw map has a bottom-row value > 0.05 (an artefact pattern) and heads of layers ≤ 1 are
   excluded, the rest ranked by ascending H; when fewer than `top_k` remain, the `top_k` heads with the
   largest S are used instead, again ordered by H (the exclusions apply to this fallback too; the reference
   code drops only the bottom-row heads there);
4. across images: how often a head is in an image's top-k.

Only one prefill per image is run, capturing the last query row over the image columns for all layers and
heads (layers × heads × image tokens floats). For LLaVA-NeXT the sums run over every grid token (newline
tokens left out) and the entropy over the base view.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from vlmscope import results
from vlmscope.attention.engine import AttentionPlan, Capture, decoder_attention_modules
from vlmscope.decoding.session import GenerationRun
from vlmscope.errors import InputError
from vlmscope.explain._json import json_safe
from vlmscope.images import list_image_files, load_image


# --- the per-map criteria ---------------------------------------------------------------------------------
def chord_elbow(values: Sequence[float]) -> float:
    """Threshold at the elbow of the ascending sorted values (max distance to the first–last chord)."""
    y = np.sort(np.asarray(values, dtype=np.float64))
    if y.size == 0:
        return 0.0
    if y.size <= 2:
        return float(y[0])
    x = np.arange(y.size, dtype=np.float64)
    dx, dy = x[-1] - x[0], y[-1] - y[0]
    length = math.hypot(dx, dy)
    if length == 0:
        return float(y[0])
    # Perpendicular distance of every point to the chord: |cross(chord, point - start)| / |chord|.
    distance = np.abs(dx * (y - y[0]) - dy * (x - x[0])) / length
    return float(y[int(np.argmax(distance))])


def label_components(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels (1..n, 0 = background) of a 2-D boolean array, by breadth-first search."""
    mask = np.asarray(binary, dtype=bool)
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not labels[rr, cc]:
                        labels[rr, cc] = count
                        queue.append((rr, cc))
    return labels, count


def spatial_entropy(attn_map: np.ndarray, binarize: float = 1e-3) -> tuple[float, int]:
    """(entropy, number of components) of one 2-D attention map; lower = one compact region."""
    a = np.asarray(attn_map, dtype=np.float64)
    b = np.maximum(a - 2.0 * a.mean(), 0.0)
    total = b.sum()
    labels, count = label_components(b > binarize)
    if total <= 0 or count == 0:
        # No region above the binarisation threshold: not a localization head. (The reference code returns
        # 0 here when B has only sub-threshold mass, which would rank the most diffuse maps first.)
        return math.inf, count
    masses = np.bincount(labels.ravel(), weights=b.ravel(), minlength=count + 1)[1:]
    p = masses[masses > 0] / total
    return float(-(p * np.log(p)).sum()), count


@dataclass
class HeadScore:
    layer: int
    head: int
    attn_sum: float
    entropy: float
    components: int
    bottom_row: bool  # raw map has a bottom-row value above the artefact limit

    def key(self) -> tuple[int, int]:
        return self.layer, self.head


def score_heads(maps: np.ndarray, sums: np.ndarray | None = None, binarize: float = 1e-3,
                bottom_row_limit: float = 0.05) -> list[HeadScore]:
    """Score every head of `maps` [layers, heads, grid_h, grid_w]; `sums` [layers, heads] default to map sums."""
    maps = np.asarray(maps, dtype=np.float64)
    if sums is None:
        sums = maps.sum(axis=(2, 3))
    scores = []
    for layer in range(maps.shape[0]):
        for head in range(maps.shape[1]):
            entropy, count = spatial_entropy(maps[layer, head], binarize)
            scores.append(HeadScore(layer, head, float(sums[layer, head]), entropy, count,
                                    bool((maps[layer, head, -1, :] > bottom_row_limit).any())))
    return scores


def select_heads(scores: Sequence[HeadScore], top_k: int = 5, min_layer: int = 2
                 ) -> tuple[list[HeadScore], float, bool]:
    """(the top_k heads ranked by entropy, the sum threshold, whether the fallback by sum was used)."""
    threshold = chord_elbow([s.attn_sum for s in scores])

    def eligible(s: HeadScore) -> bool:
        return s.layer >= min_layer and not s.bottom_row

    kept = [s for s in scores if s.attn_sum >= threshold and eligible(s) and math.isfinite(s.entropy)]
    fallback = len(kept) < top_k
    if fallback:
        kept = sorted((s for s in scores if eligible(s)), key=lambda s: -s.attn_sum)[:top_k]
    kept = sorted(kept, key=lambda s: (s.entropy, -s.attn_sum))
    return kept[:top_k], threshold, fallback


# --- running the model ------------------------------------------------------------------------------------
def image_attention(vlm: Any, image: Any, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """One prefill: (sums [layers, heads] over the image-grid tokens, first-grid maps [layers, heads, h, w])."""
    adapter = vlm.adapter
    batch = vlm.encode([load_image(image)], [prompt])
    grids = adapter.image_grids(batch, 0)
    plan = AttentionPlan(decoder_attention_modules(vlm.model))
    captures = [plan.add_capture(layer, Capture(rows="last", columns="image", to_cpu=True))
                for layer in range(adapter.num_layers)]
    with torch.no_grad(), GenerationRun(vlm.model, adapter, batch, (), capture_plan=plan) as run:
        run.prefill()
    rows = torch.stack([c.records[0][0, :, 0, :] for c in captures]).float().numpy()  # [L, H, image tokens]
    on_grid = np.concatenate([g.indices().ravel() for g in grids])
    sums = rows[..., on_grid].sum(axis=-1)
    return sums, grids[0].take(rows)


@dataclass
class HeadRanking:
    """Localization heads ranked over a set of images: `ranking` (best first) and each image's selection.

    Saved as run.json (kind "heads"); `HeadRanking.load(dir)` reads it back.
    """

    kind: ClassVar[str] = "heads"
    model_id: str
    prompt: str
    top_k: int
    images: list[str]
    min_layer: int = 2
    per_image: list[dict[str, Any]] = field(default_factory=list)
    ranking: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        best = ", ".join(f"L{layer}H{head}" for layer, head in self.heads(3))
        return (f"HeadRanking(model={self.model_id!r}, images={len(self.images)}, top_k={self.top_k}, "
                f"best=[{best}])")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (an infinite entropy is null)."""
        return json_safe({
            "kind": self.kind,
            "provenance": self.provenance,
            "model": self.model_id, "prompt": self.prompt, "top_k": self.top_k, "images": self.images,
            "criteria": {"threshold": "chord elbow of attention sums", "score": "spatial entropy (ascending)",
                         "binarize": 1e-3, "bottom_row_limit": 0.05, "min_layer": self.min_layer},
            "ranking": self.ranking, "per_image": self.per_image,
        })

    def heads(self, k: int | None = None) -> list[tuple[int, int]]:
        """The most frequently selected (layer, head) pairs, best first."""
        return [(r["layer"], r["head"]) for r in self.ranking[: k or len(self.ranking)]]

    def table(self, limit: int | None = None) -> str:
        lines = [f"{'rank':>4}  {'layer':>5}  {'head':>4}  {'count':>5}  {'freq':>6}  {'mean_sum':>9}  "
                 f"{'mean_entropy':>12}"]
        for i, r in enumerate(self.ranking[: limit or len(self.ranking)], 1):
            lines.append(f"{i:>4}  {r['layer']:>5}  {r['head']:>4}  {r['count']:>5}  {r['frequency']:>6.3f}  "
                         f"{r['mean_attn_sum']:>9.4f}  {r['mean_entropy']:>12.4f}")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> dict[str, str]:
        """Write run.json into `out_dir` (created if missing); returns {"run": path}."""
        out = results.prepare_output_dir(out_dir, self.kind)
        return {"run": str(results.write_run(out, self.kind, self.to_json()))}

    @classmethod
    def load(cls, out_dir: str | Path) -> HeadRanking:
        """Read a saved ranking back (an infinite entropy was written as null and reads back as inf)."""
        run = results.read_run(out_dir, cls.kind)

        def entropy(value: Any) -> float:
            return math.inf if value is None else float(value)

        ranking = [{**r, "mean_entropy": entropy(r["mean_entropy"])} for r in run["ranking"]]
        per_image = [{**p, "top": [{**t, "entropy": entropy(t["entropy"])} for t in p["top"]]}
                     for p in run["per_image"]]
        return cls(run["model"], run["prompt"], run["top_k"], run["images"], run["criteria"]["min_layer"],
                   per_image, ranking, run["provenance"])


def image_files(images: Any) -> list[Any]:
    """A directory (its image files, sorted), one path, or a list of paths / PIL images."""
    if isinstance(images, str | Path):
        path = Path(images)
        if path.is_dir():
            return list_image_files(path)
        return [path]
    items = list(images)
    if not items:
        raise InputError("no images given: pass a directory or a list of images")
    return items


def rank_heads(vlm: Any, images: Any, prompt: str, top_k: int = 5, min_layer: int = 2,
               progress: Any = None) -> HeadRanking:
    """Rank localization heads over `images` (a directory or a list) for one prompt."""
    if top_k < 1:
        raise InputError("--top must be at least 1")
    start = time.perf_counter()
    items = image_files(images)
    names = [str(p) if isinstance(p, str | Path) else f"image{i}" for i, p in enumerate(items)]
    ranking = HeadRanking(vlm.model_id, prompt, top_k, names, min_layer)
    counts: dict[tuple[int, int], int] = {}
    sums_acc: dict[tuple[int, int], list[float]] = {}
    entropy_acc: dict[tuple[int, int], list[float]] = {}
    for name, item in zip(names, items):
        sums, maps = image_attention(vlm, item, prompt)
        scores = score_heads(maps, sums)
        top, threshold, fallback = select_heads(scores, top_k, min_layer)
        for s in top:
            counts[s.key()] = counts.get(s.key(), 0) + 1
            sums_acc.setdefault(s.key(), []).append(s.attn_sum)
            entropy_acc.setdefault(s.key(), []).append(s.entropy)
        ranking.per_image.append({"image": name, "threshold": threshold, "fallback": fallback,
                                  "above_threshold": int(sum(s.attn_sum >= threshold for s in scores)),
                                  "top": [asdict(s) for s in top]})
        if progress is not None:
            progress(name, top)
    rows = []
    for key, count in counts.items():
        finite = [e for e in entropy_acc[key] if math.isfinite(e)]
        rows.append({"layer": key[0], "head": key[1], "count": count, "frequency": count / len(items),
                     "mean_attn_sum": float(np.mean(sums_acc[key])),
                     "mean_entropy": float(np.mean(finite)) if finite else math.inf})
    rows.sort(key=lambda r: (-r["count"], r["mean_entropy"], -r["mean_attn_sum"], r["layer"], r["head"]))
    ranking.ranking = rows
    ranking.provenance = results.run_provenance(vlm, wall_seconds=time.perf_counter() - start)
    return ranking
