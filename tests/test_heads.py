"""Localization-head selection: hand-computed criteria, independent oracles, stock eager attention, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlmscope.api import VLM
from vlmscope.cli import main as cli_main
from vlmscope.explain.heads import (
    HeadScore,
    chord_elbow,
    image_attention,
    label_components,
    rank_heads,
    score_heads,
    select_heads,
    spatial_entropy,
)

PROMPT = "the red ball on the left"


def components_oracle(binary: np.ndarray) -> list[set[tuple[int, int]]]:
    """Union-find over all pixel pairs within Chebyshev distance 1 (independent of the BFS)."""
    pixels = [tuple(p) for p in np.argwhere(binary)]
    parent = {p: p for p in pixels}

    def find(p):
        while parent[p] != p:
            p = parent[p]
        return p

    for a in pixels:
        for b in pixels:
            if max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 1:
                parent[find(a)] = find(b)
    groups: dict = {}
    for p in pixels:
        groups.setdefault(find(p), set()).add(p)
    return sorted(groups.values(), key=min)


def as_sets(labels: np.ndarray, count: int) -> list[set[tuple[int, int]]]:
    return sorted(({tuple(p) for p in np.argwhere(labels == k)} for k in range(1, count + 1)), key=min)


def test_components_are_8_connected() -> None:
    binary = np.array([[1, 0, 0, 1],
                       [0, 1, 0, 1],
                       [0, 0, 0, 0],
                       [1, 1, 0, 1]], dtype=bool)
    labels, count = label_components(binary)
    assert count == 4
    assert as_sets(labels, count) == [{(0, 0), (1, 1)}, {(0, 3), (1, 3)}, {(3, 0), (3, 1)}, {(3, 3)}]
    rng = np.random.RandomState(0)
    for _ in range(20):
        binary = rng.rand(7, 9) < 0.35
        labels, count = label_components(binary)
        assert as_sets(labels, count) == components_oracle(binary)
        assert ((labels > 0) == binary).all()


def test_spatial_entropy_by_hand() -> None:
    a = np.zeros((4, 4))
    a[0, 0], a[3, 3] = 0.3, 0.1
    # mean = 0.025, B = ReLU(A - 0.05): 0.25 and 0.05 in two components, p = 5/6 and 1/6.
    entropy, count = spatial_entropy(a)
    assert count == 2
    assert entropy == pytest.approx(-(5 / 6 * math.log(5 / 6) + 1 / 6 * math.log(1 / 6)))
    one = np.zeros((4, 4))
    one[1, 1], one[2, 2] = 0.4, 0.3  # diagonal neighbours: one component holding all the mass
    assert spatial_entropy(one) == (pytest.approx(0.0), 1)
    assert spatial_entropy(np.full((4, 4), 1 / 16))[0] == math.inf  # B ≡ 0
    # Mass below the binarisation threshold counts in the denominator: one component with p = 0.2 / 0.2005.
    faint = np.zeros((4, 4))
    # Solve f = 2 * mean + 0.0005 with mean = (0.23 + f) / 16, so B at (3, 3) is 0.0005.
    faint[0, 0], faint[3, 3] = 0.23, (0.23 / 8 + 0.0005) / (7 / 8)
    b = np.maximum(faint - 2 * faint.mean(), 0)
    assert (b > 1e-3).sum() == 1 and 0 < b[3, 3] <= 1e-3
    p = b[0, 0] / b.sum()
    assert spatial_entropy(faint)[0] == pytest.approx(-p * math.log(p))


def elbow_oracle(values: list[float]) -> float:
    """Vector projection formulation: distance = |v - (v·u)u| for v = point - first point, u = chord unit."""
    y = np.sort(np.asarray(values, dtype=float))
    points = np.stack([np.arange(len(y)), y], 1)
    chord = points[-1] - points[0]
    unit = chord / np.linalg.norm(chord)
    v = points - points[0]
    d = np.linalg.norm(v - (v @ unit)[:, None] * unit, axis=1)
    return float(y[np.argmax(d)])


def test_chord_elbow() -> None:
    # Chord from (0, 0) to (4, 10): distances 6, 12, 18 (/ |chord|) for the points 1, 2, 3 → elbow value 3.
    assert chord_elbow([10, 2, 0, 3, 1]) == 3
    rng = np.random.RandomState(1)
    for _ in range(20):
        values = list(rng.exponential(size=30))
        assert chord_elbow(values) == elbow_oracle(values)
    assert chord_elbow([0.4, 0.2]) == 0.2


def crafted_maps() -> np.ndarray:
    """[layers 4, heads 3, 4, 4] attention maps with known outcomes (see test_select_heads)."""
    maps = np.zeros((4, 3, 4, 4))
    low = np.linspace(0.004, 0.02, 7)
    # The largest of them (at the elbow, so kept by S >= threshold) sits in layer 0.
    cells = [(2, 1), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (0, 0)]
    for value, (layer, head) in zip(low, cells):
        maps[layer, head, 1, 1] = value  # compact but with little attention mass
    maps[2, 2, 1, 1] = 0.6  # compact, high sum: the best head
    maps[1, 1, 1, 1] = 0.65  # the same pattern in layer 1: excluded
    maps[3, 0, 0, 0], maps[3, 0, 2, 3] = 0.35, 0.3  # two blobs: higher entropy
    maps[3, 1, 1, 2], maps[3, 1, 3, 0] = 0.5, 0.08  # bottom-row value > 0.05: excluded
    maps[3, 2, 0, 3] = 0.3  # compact, moderate sum
    return maps


def test_select_heads() -> None:
    maps = crafted_maps()
    scores = score_heads(maps)
    by_key = {s.key(): s for s in scores}
    assert by_key[(3, 1)].bottom_row and not by_key[(2, 2)].bottom_row
    assert by_key[(3, 0)].entropy > by_key[(2, 2)].entropy == pytest.approx(0.0)
    top, threshold, fallback = select_heads(scores, top_k=3)
    assert threshold == chord_elbow(maps.sum(axis=(2, 3)).ravel())
    assert 0.02 <= threshold <= 0.3 and not fallback
    # Compact maps first (entropy 0, larger sum breaks the tie), two-blob map last; layer 1, bottom-row and
    # low-sum heads never appear.
    assert [s.key() for s in top] == [(2, 2), (3, 2), (3, 0)]
    # Too few eligible heads above the threshold: fall back to the largest sums (same exclusions).
    fewer, _, fallback = select_heads(scores, top_k=4)
    assert fallback and len(fewer) == 4
    assert {s.key() for s in fewer} == {(2, 2), (3, 0), (3, 2), (2, 0)}
    assert all(s.layer >= 2 and not s.bottom_row for s in fewer)


def stock_last_row(vlm: VLM, image: Image.Image, prompt: str) -> np.ndarray:
    """Stock eager prefill with output_attentions: last row over image columns [L, H, N]."""
    model = vlm.model
    batch = vlm.encode([image], [prompt])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs,
                        output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    cols = batch.image_mask[0].nonzero().flatten()
    return np.stack([a[0, :, -1, cols].numpy() for a in out.attentions])


def make_images(n: int) -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(i).rand(36, 48, 3) * 255).astype("uint8")) for i in range(n)]


def test_image_attention_matches_stock_and_rank_counts(tiny_llava: VLM) -> None:
    vlm = tiny_llava
    images = make_images(3)
    sums, maps = image_attention(vlm, images[0], PROMPT)
    stock = stock_last_row(vlm, images[0], PROMPT)
    np.testing.assert_allclose(maps, stock.reshape(4, 4, 4, 4), atol=1e-5)
    np.testing.assert_allclose(sums, stock.sum(-1), atol=1e-5)
    ranking = rank_heads(vlm, images, PROMPT, top_k=2)
    assert sum(r["count"] for r in ranking.ranking) == sum(len(e["top"]) for e in ranking.per_image)
    # Each image's selection equals the selection computed from the stock attention.
    for image, entry in zip(images, ranking.per_image):
        expected, _, _ = select_heads(score_heads(stock_last_row(vlm, image, PROMPT).reshape(4, 4, 4, 4)), 2)
        assert [(t["layer"], t["head"]) for t in entry["top"]] == [s.key() for s in expected]
    assert all(r["layer"] >= 2 for r in ranking.ranking)
    counts = [r["count"] for r in ranking.ranking]
    assert counts == sorted(counts, reverse=True)
    assert ranking.heads(1) == [(ranking.ranking[0]["layer"], ranking.ranking[0]["head"])]


def test_next_uses_base_grid_for_entropy(tiny_llava_next: VLM) -> None:
    vlm = tiny_llava_next
    image = make_images(1)[0]
    sums, maps = image_attention(vlm, image, PROMPT)
    batch = vlm.encode([image], [PROMPT])
    grids = vlm.adapter.image_grids(batch, 0)
    stock = stock_last_row(vlm, image, PROMPT)
    assert maps.shape == (4, 4, 4, 4)
    np.testing.assert_allclose(maps, grids[0].take(stock), atol=1e-5)
    on_grid = np.concatenate([g.indices().ravel() for g in grids])
    np.testing.assert_allclose(sums, stock[..., on_grid].sum(-1), atol=1e-5)  # newline tokens left out


def test_cli_prints_and_saves_the_ranking(tmp_path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(make_images(2)):
        image.save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "heads"
    assert cli_main(["heads", "--model", "tiny-llava", "--images", str(folder), "--prompt", PROMPT,
                     "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rank  layer  head  count" in printed
    data = json.loads((out / "run.json").read_text())
    assert data["kind"] == "heads" and data["provenance"]["model"] == "tiny-llava"
    assert data["top_k"] == 3 and len(data["images"]) == 2 and len(data["per_image"]) == 2
    # Fewer than --top heads may survive the exclusions on a 4-layer model.
    assert sum(r["count"] for r in data["ranking"]) == sum(len(e["top"]) for e in data["per_image"])
    assert all(1 <= len(e["top"]) <= 3 for e in data["per_image"])
    assert cli_main(["heads", "--model", "tiny-llava", "--images", str(tmp_path / "missing"),
                     "--prompt", PROMPT]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["heads", "--model", "tiny-llava", "--images", str(empty), "--prompt", PROMPT]) == 2
    assert "no image files" in capsys.readouterr().err


def test_head_score_key() -> None:
    assert HeadScore(3, 1, 0.5, 0.0, 1, False).key() == (3, 1)
