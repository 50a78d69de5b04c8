"""Bootstrap confidence intervals and paired bootstrap comparisons for the pooled CHAIR / POPE metrics.

Every metric here is a function of *sums* of per-item counts (CHAIR_I = Σ hallucinated mentions / Σ mentions,
POPE precision = Σ tp / Σ (tp + fp), ...), so a bootstrap replicate resamples items (images) with
replacement, sums their counts and re-evaluates the metric, exactly as the point estimate is computed.
POPE asks several questions about each image: its items are images (all their questions move together), so
the interval reflects the sampling of images, not of correlated questions.

- `bootstrap_intervals`: percentile interval (default 95 %) of each metric over `draws` replicates.
- `paired_bootstrap`: for two runs on the same items, the same resampled items for both, giving the
  difference A − B, its percentile interval, and a two-sided p-value for "no difference": the share of
  replicates whose difference, centred on the observed one, is at least as far from zero as the observed one,
  ``(1 + #{|d* − d| ≥ |d|}) / (1 + draws)`` (so it is never 0; with identical runs it is 1).

Replicates come from ``numpy.random.default_rng(seed)``: same seed, same draws, same interval. Quantiles are
numpy's default (linear interpolation between order statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vlmscope.errors import InputError

__all__ = [
    "CHAIR_METRICS",
    "POPE_METRICS",
    "Comparison",
    "Interval",
    "bootstrap_intervals",
    "chair_intervals",
    "chair_item_counts",
    "group_counts",
    "paired_bootstrap",
    "pope_image_counts",
    "pope_intervals",
    "pope_item_counts",
    "pope_metric_fns",
]

Counts = Mapping[str, np.ndarray]
MetricFn = Callable[[Counts], np.ndarray]
DEFAULT_DRAWS = 1000


def _ratio(num: np.ndarray, den: np.ndarray, scale: float = 100.0) -> np.ndarray:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    return np.divide(scale * num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.divide(2 * p * r, p + r, out=np.zeros(np.broadcast(p, r).shape), where=(p + r) != 0)


# The pooled definitions of `vlmscope.eval.chair.chair_scores` and `vlmscope.eval.pope.pope_scores`, on summed
# counts (each works on scalars and on arrays of replicates).
CHAIR_METRICS: dict[str, MetricFn] = {
    "CHAIR_S": lambda c: _ratio(c["hallucinated_captions"], c["captions"]),
    "CHAIR_I": lambda c: _ratio(c["hallucinated_mentions"], c["mentions"]),
    "Recall": lambda c: _ratio(c["recalled_objects"], c["gt_objects"]),
    "Len": lambda c: _ratio(c["units"], c["captions"], 1.0),
    "Precision": lambda c: _ratio(c["recalled_objects"], c["unique_mentions"]),
    "F1": lambda c: _f1(_ratio(c["recalled_objects"], c["unique_mentions"]), _ratio(c["recalled_objects"], c["gt_objects"])),
}
POPE_METRICS: dict[str, MetricFn] = {
    "Accuracy": lambda c: _ratio(c["tp"] + c["tn"], c["n"]),
    "Precision": lambda c: _ratio(c["tp"], c["tp"] + c["fp"]),
    "Recall": lambda c: _ratio(c["tp"], c["tp"] + c["fn"]),
    "F1": lambda c: _f1(_ratio(c["tp"], c["tp"] + c["fp"]), _ratio(c["tp"], c["tp"] + c["fn"])),
    "Yes_ratio": lambda c: _ratio(c["yes"], c["n"]),
}


def chair_item_counts(per_caption: Sequence[Mapping[str, Any]]) -> tuple[list[int], dict[str, np.ndarray]]:
    """Image ids and per-caption count columns of `ChairResult.per_caption` records."""
    ids = [int(r["image_id"]) for r in per_caption]
    cols = {
        "captions": [1] * len(per_caption),
        "hallucinated_captions": [int(bool(r["mscoco_hallucinated_words"])) for r in per_caption],
        "mentions": [len(r["mscoco_generated_words"]) for r in per_caption],
        "hallucinated_mentions": [len(r["mscoco_hallucinated_words"]) for r in per_caption],
        "gt_objects": [len(r["mscoco_gt_words"]) for r in per_caption],
        "recalled_objects": [len(set(r["mscoco_generated_words"]) & set(r["mscoco_gt_words"])) for r in per_caption],
        "unique_mentions": [len(set(r["mscoco_generated_words"])) for r in per_caption],
        "units": [len(r["words"]) for r in per_caption],
    }
    return ids, {k: np.asarray(v, dtype=float) for k, v in cols.items()}


def pope_item_counts(preds: Sequence[str | None], labels: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-question count columns (tp, fp, tn, fn, yes, n) of parsed predictions against labels."""
    p = np.asarray([str(x) for x in preds])
    g = np.asarray([str(x) for x in labels])
    cols = {
        "tp": (p == "yes") & (g == "yes"),
        "fp": (p == "yes") & (g == "no"),
        "tn": (p == "no") & (g == "no"),
        "fn": (p == "no") & (g == "yes"),
        "yes": p == "yes",
        "n": np.ones(len(p), dtype=bool),
    }
    return {k: v.astype(float) for k, v in cols.items()}


def group_counts(keys: Sequence[Any], counts: Counts) -> tuple[list[Any], dict[str, np.ndarray]]:
    """Sum the count rows that share a key (e.g. an image's questions), keys in first-seen order."""
    order = list(dict.fromkeys(keys))
    index = {k: i for i, k in enumerate(order)}
    rows = np.asarray([index[k] for k in keys], dtype=int)
    return order, {name: np.bincount(rows, weights=col, minlength=len(order)) for name, col in counts.items()}


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval."""

    value: float
    low: float
    high: float
    level: float
    draws: int
    seed: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.1f} [{self.low:.1f}, {self.high:.1f}]"


@dataclass(frozen=True)
class Comparison:
    """Difference A − B of one metric over shared items, with its paired bootstrap interval and p-value."""

    a: float
    b: float
    diff: float
    low: float
    high: float
    p_value: float
    level: float
    draws: int
    seed: int
    n_items: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _check(counts: Counts, draws: int, level: float) -> int:
    if draws < 1:
        raise InputError(f"the number of bootstrap draws must be >= 1, got {draws}; pass e.g. --bootstrap 1000")
    if not 0 < level < 1:
        raise InputError(f"confidence level must be between 0 and 1, got {level}")
    lengths = {len(np.asarray(v)) for v in counts.values()}
    if len(lengths) != 1:
        raise InputError("count columns have different lengths; give one value per item in every column")
    n = lengths.pop()
    if n == 0:
        raise InputError("no items to bootstrap; score at least one item")
    return n


def _replicate_sums(columns: Sequence[Counts], n: int, draws: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Column sums of `draws` resamples (the same resampled items for every entry of `columns`)."""
    rng = np.random.default_rng(seed)
    mats = [np.stack([np.asarray(c[k], dtype=float) for k in c], axis=1) for c in columns]
    out = [np.empty((draws, m.shape[1])) for m in mats]
    chunk = max(1, 2_000_000 // max(n, 1))
    for start in range(0, draws, chunk):
        stop = min(draws, start + chunk)
        picks = rng.integers(0, n, size=(stop - start, n))
        # Multiplicity of every item in each resample, then one matrix product per run.
        weights = np.zeros((stop - start, n))
        np.add.at(weights, (np.arange(stop - start)[:, None], picks), 1.0)
        for mat, dest in zip(mats, out):
            dest[start:stop] = weights @ mat
    return [{k: sums[:, j] for j, k in enumerate(c)} for c, sums in zip(columns, out)]


def _totals(counts: Counts) -> dict[str, np.ndarray]:
    return {k: np.asarray(np.sum(np.asarray(v, dtype=float))) for k, v in counts.items()}


def _quantiles(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_intervals(
    counts: Counts,
    metrics: Mapping[str, MetricFn],
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Percentile bootstrap interval of each metric; `counts` holds one value per item in every column."""
    n = _check(counts, draws, level)
    (reps,) = _replicate_sums([counts], n, draws, seed)
    totals = _totals(counts)
    out = {}
    for name, fn in metrics.items():
        low, high = _quantiles(fn(reps), level)
        out[name] = Interval(float(fn(totals)), low, high, level, draws, seed)
    return out


def paired_bootstrap(
    counts_a: Counts,
    counts_b: Counts,
    metrics: Mapping[str, MetricFn],
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Comparison]:
    """Paired bootstrap of A − B for each metric; row i of `counts_a` and of `counts_b` is the same item."""
    n = _check(counts_a, draws, level)
    if _check(counts_b, draws, level) != n:
        raise InputError("paired runs must cover the same items; compare them on their shared items")
    reps_a, reps_b = _replicate_sums([counts_a, counts_b], n, draws, seed)
    tot_a, tot_b = _totals(counts_a), _totals(counts_b)
    out = {}
    for name, fn in metrics.items():
        a, b = float(fn(tot_a)), float(fn(tot_b))
        diff = a - b
        diffs = fn(reps_a) - fn(reps_b)
        low, high = _quantiles(diffs, level)
        # Centred on the observed difference, the replicates stand for the null "no difference"; a tiny
        # tolerance keeps ties (identical runs: every replicate 0) counted as "at least as far".
        extreme = int(np.sum(np.abs(diffs - diff) >= abs(diff) - 1e-9))
        p_value = (1 + extreme) / (1 + draws)
        out[name] = Comparison(a, b, diff, low, high, min(1.0, p_value), level, draws, seed, n)
    return out


def chair_intervals(result: Any, draws: int = DEFAULT_DRAWS, seed: int = 0, level: float = 0.95) -> dict[str, Interval]:
    """Bootstrap intervals (captions, i.e. images, resampled) of every metric of a `ChairResult` ({} if empty)."""
    if not result.per_caption:
        return {}
    _, counts = chair_item_counts(result.per_caption)
    return bootstrap_intervals(counts, CHAIR_METRICS, draws, seed, level)


def pope_image_counts(items: Sequence[Mapping[str, Any]]) -> tuple[list[Any], dict[str, np.ndarray], list[str]]:
    """Per-image count columns ``"<split>/<count>"`` of `pope_scores(...)["items"]`, and the splits in order.

    Rows are images (an image's questions in every split move together when resampled)."""
    splits = list(dict.fromkeys(str(it["split"]) for it in items))
    base = pope_item_counts([it["pred"] for it in items], [it["label"] for it in items])
    cols: dict[str, np.ndarray] = {}
    for split in splits:
        mask = np.asarray([str(it["split"]) == split for it in items], dtype=float)
        cols.update({f"{split}/{k}": v * mask for k, v in base.items()})
    keys, grouped = group_counts([it.get("image") or it["question_id"] for it in items], cols)
    return keys, grouped, splits


def pope_metric_fns(splits: Sequence[str], groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, MetricFn]:
    """Metric functions over `pope_image_counts` columns: ``"<split>/<metric>"`` and the mean over splits
    (plain metric names, as `pope_scores(...)["mean"]`); with `groups` (``{dataset: [splits]}``,
    `vlmscope.eval.pope.dataset_groups`) each dataset's mean, ``"<dataset>/<metric>"``, instead of the mean."""

    def per_split(split: str, fn: MetricFn) -> MetricFn:
        return lambda c: fn({k.split("/", 1)[1]: v for k, v in c.items() if k.startswith(split + "/")})

    fns: dict[str, MetricFn] = {}
    for name, fn in POPE_METRICS.items():
        parts = [per_split(s, fn) for s in splits]
        if not groups:  # with datasets named, no mean is taken across them
            fns[name] = lambda c, parts=parts: sum(p(c) for p in parts) / len(parts)
        for split, part in zip(splits, parts):
            fns[f"{split}/{name}"] = part
        for dataset, members in (groups or {}).items():
            chosen = [part for split, part in zip(splits, parts) if split in members]
            fns[f"{dataset}/{name}"] = lambda c, chosen=chosen: sum(p(c) for p in chosen) / len(chosen)
    return fns


def pope_intervals(
    items: Sequence[Mapping[str, Any]], draws: int = DEFAULT_DRAWS, seed: int = 0, level: float = 0.95
) -> dict[str, Interval]:
    """Bootstrap intervals (images resampled) of the split means and of every split's metrics ({} if empty);
    with A-OKVQA / GQA questions, of each dataset's mean instead (`vlmscope.eval.pope.dataset_groups`)."""
    if not items:
        return {}
    from vlmscope.eval.pope import dataset_groups

    groups = dataset_groups(items)
    if len(groups) > 1:
        # Stratified: each dataset's images are resampled on their own, so no draw lacks a dataset.
        out: dict[str, Interval] = {}
        for dataset in groups:
            out.update(pope_intervals([it for it in items if it.get("dataset") == dataset], draws, seed, level))
        rest = [it for it in items if it.get("dataset") not in groups]
        return {**(pope_intervals(rest, draws, seed, level) if rest else {}), **out}
    _, counts, splits = pope_image_counts(items)
    return bootstrap_intervals(counts, pope_metric_fns(splits, groups), draws, seed, level)
