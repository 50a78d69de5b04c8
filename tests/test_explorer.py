"""The explorer page without a browser: what it embeds equals the result's maps, its size budget, the CLI.

The page in a real browser (clicks, pickers, pixels) is tests/test_explorer_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmscope.cli import main as cli_main
from vlmscope.errors import InputError
from vlmscope.explain.explorer import (
    build_explorer,
    dequantise,
    expected_map,
    page_size_estimate,
    parse_head_pairs,
    quantise,
    save_explorer,
)
from vlmscope.explain.maps import ExplainResult, explain
from vlmscope.models.adapters import ImageGrid

PROMPT = "what is in the image ?"


def embedded(page: str) -> dict:
    match = re.search(r'<script id="vlmscope-data" type="application/json">(.*?)</script>', page, re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))


def decode_maps(data: dict) -> np.ndarray:
    shape = (len(data["steps"]), len(data["layers"]), len(data["heads"]), data["grid"]["height"],
             data["grid"]["width"])
    codes = np.frombuffer(base64.b64decode(data["maps"]), dtype=np.uint8).reshape(shape)
    limits = np.frombuffer(base64.b64decode(data["limits"]), dtype="<f4").reshape(*shape[:3], 2)
    return dequantise(codes, limits)


def synthetic_result(steps: int, layers: int, heads: int, side: int, seed: int = 0) -> ExplainResult:
    """An ExplainResult with random softmax-like rows, for size measurements without a model."""
    rng = np.random.default_rng(seed)
    maps = rng.dirichlet(np.ones(side * side), size=(steps, layers, heads)).astype(np.float32)
    grid = ImageGrid("image", 0, side, side, side)
    return ExplainResult(
        grid_maps={"image": maps.reshape(steps, layers, heads, side, side)}, grids=[grid],
        steps=list(range(steps)), layers=list(range(layers)), heads=list(range(heads)),
        tokens=[f"t{i}" for i in range(steps)], text="synthetic", token_ids=list(range(steps)), prompt_ids=[],
        prompt="p", model_id="synthetic", image=Image.new("RGB", (336, 336), (120, 90, 60)),
        params={"scale": "shared"})


@pytest.fixture(scope="module")
def result(tiny_llava) -> ExplainResult:
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(40, 56, 3) * 255).astype("uint8"))
    return explain(tiny_llava, image, PROMPT, max_new_tokens=4)


def test_quantise_error_is_within_half_a_code(result: ExplainResult) -> None:
    codes, limits = quantise(result.maps)
    back = dequantise(codes, limits)
    span = (limits[..., 1] - limits[..., 0])[..., None, None]
    assert np.all(np.abs(back - result.maps) <= span / 510 + 1e-7)
    # The extremes of every map are exact (up to float32 of the limits).
    assert np.allclose(back.max(axis=(-1, -2)), result.maps.max(axis=(-1, -2)), atol=1e-7)


def test_page_embeds_the_result_and_nothing_from_the_network(result: ExplainResult) -> None:
    page = build_explorer(result, localization_heads=[(1, 0), (3, 2)])
    data = embedded(page)
    assert data["tokens"] == result.tokens and data["steps"] == result.steps
    assert data["layers"] == result.layers and data["heads"] == result.heads
    assert data["grid"]["region"] == list(result.grids[0].region)
    # Each embedded map is the result's map to within half a quantisation step of its own range.
    maps = decode_maps(data)
    span = result.maps.max(axis=(-1, -2), keepdims=True) - result.maps.min(axis=(-1, -2), keepdims=True)
    assert np.all(np.abs(maps - result.maps) <= span / 510 + 1e-7)
    # Localization heads as indices into the embedded layers/heads.
    assert data["localization_heads"] == [[1, 0], [3, 2]]
    # The image is embedded (JPEG) with the original aspect ratio.
    src = data["image"]["src"]
    assert src.startswith("data:image/jpeg;base64,")
    picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert picture.size == (56, 40)
    # Self-contained: no external scripts, styles or images.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page
    assert data["provenance"]["model"] == "tiny-llava"


def test_script_end_tags_in_tokens_cannot_break_the_page(result: ExplainResult) -> None:
    from dataclasses import replace

    evil = replace(result, tokens=["</script><b>x</b>"] + result.tokens[1:], prompt="<i>p</i>")
    page = build_explorer(evil)
    assert page.count("</script>") == 2  # the data element's and the code's own end tags, nothing injected
    assert embedded(page)["tokens"][0] == "</script><b>x</b>"
    assert "<title>tiny-llava: &lt;i&gt;p&lt;/i&gt;</title>" in page


def test_expected_map_reduces_heads_then_layers(result: ExplainResult) -> None:
    maps = result.maps[2].astype(np.float64)
    assert np.allclose(expected_map(result, 2, "max", "mean"), maps.mean(axis=1).max(axis=0))
    assert np.allclose(expected_map(result, 2, 3, 1), maps[3, 1])
    assert np.allclose(expected_map(result, 2, "mean", 0), maps[:, 0].mean(axis=0))
    pairs = [(1, 0), (3, 2)]
    assert np.allclose(expected_map(result, 2, head="localization", localization_heads=pairs),
                       (maps[1, 0] + maps[3, 2]) / 2)


def test_size_budget_is_measured_and_enforced() -> None:
    # The estimate the budget check uses is within 3 % of the real page (here 8 tokens × 4 × 8 × 24²).
    small = synthetic_result(8, 4, 8, 24)
    page = build_explorer(small)
    image_url = embedded(page)["image"]["src"]
    estimate = page_size_estimate(8, 4, 8, 24 * 24, image_bytes=len(image_url))
    assert abs(len(page.encode()) - estimate) / len(page.encode()) < 0.03
    # A 32-layer × 32-head model with 64 tokens and 24×24 image tokens: all layers are over the default
    # budget (about 50 MiB), 4 chosen layers fit in about 6 MiB.
    assert page_size_estimate(64, 32, 32, 576) > 48 * 2**20
    assert page_size_estimate(64, 4, 32, 576) < 7 * 2**20
    with pytest.raises(InputError, match="select fewer layers"):
        build_explorer(small, max_bytes=100_000)


@pytest.mark.parametrize("text, pairs", [("14:3,15:7", [(14, 3), (15, 7)]), ("", []), (None, [])])
def test_parse_head_pairs(text, pairs) -> None:
    assert parse_head_pairs(text) == pairs


def test_unknown_localization_head_is_refused(result: ExplainResult) -> None:
    from dataclasses import replace

    partial = replace(result, grid_maps={"image": result.maps[:, :2]}, layers=[0, 1])
    with pytest.raises(InputError, match="L3H0 is not among the captured layers"):
        build_explorer(partial, localization_heads=[(3, 0)])


def test_save_refuses_a_folder_or_another_suffix(result: ExplainResult, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        save_explorer(result, tmp_path)
    with pytest.raises(InputError, match="HTML file"):
        save_explorer(result, tmp_path / "page.png")
    assert list(tmp_path.iterdir()) == []


def test_cli_explore_and_explain_html(image_file: Path, tmp_path: Path, capsys) -> None:
    page = tmp_path / "explore.html"
    code = cli_main(["explore", "--model", "tiny-llava", "--image", str(image_file), "--prompt", PROMPT,
                     "--max-new-tokens", "3", "--layers", "1,2", "--localization-heads", "2:1", "--out", str(page),
                     "--json"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)  # --json: only JSON on stdout
    assert summary["page"] == str(page) and summary["bytes"] == page.stat().st_size
    data = embedded(page.read_text())
    assert data["layers"] == [1, 2] and data["localization_heads"] == [[1, 1]]
    assert summary["maps_shape"][:3] == [len(data["steps"]), 2, 4]

    # explain --html writes the same page beside its folder, and explore --result rebuilds it from the folder.
    folder, html_page, rebuilt = tmp_path / "explained", tmp_path / "explain.html", tmp_path / "rebuilt.html"
    assert cli_main(["explain", "--model", "tiny-llava", "--image", str(image_file), "--prompt", PROMPT,
                     "--max-new-tokens", "3", "--layers", "1,2", "--no-overlays", "--out", str(folder),
                     "--html", str(html_page)]) == 0
    assert cli_main(["explore", "--result", str(folder), "--image", str(image_file), "--out", str(rebuilt)]) == 0
    capsys.readouterr()
    first, second = embedded(html_page.read_text()), embedded(rebuilt.read_text())
    assert first["maps"] == second["maps"] == data["maps"]  # greedy is deterministic: the same maps thrice
    assert first["tokens"] == second["tokens"] == data["tokens"]


def test_explain_answer_equals_generation_time_capture(tiny_llava, result: ExplainResult) -> None:
    from vlmscope.explain.explorer import explain_answer

    forced = explain_answer(tiny_llava, result.image, PROMPT, result.token_ids, decoding="greedy")
    assert forced.tokens == result.tokens and forced.text == result.text
    np.testing.assert_allclose(forced.maps, result.maps, rtol=1e-4, atol=1e-6)


def test_compare_panel_and_cli(tiny_llava, result: ExplainResult, image_file: Path, tmp_path: Path,
                               capsys) -> None:
    from dataclasses import replace

    other = replace(result, tokens=["x", "y"], steps=[0, 1], text="x y",
                    grid_maps={"image": result.maps[:2] * 0.5})
    data = embedded(build_explorer(result, compare=other, labels=("greedy", "beam"),
                                   compare_hallucinated_steps=[1]))
    assert data["compare"]["label"] == "beam" and data["compare"]["tokens"] == ["x", "y"]
    assert data["compare"]["hallucinated"] == [1]
    second = decode_maps({**data, "steps": [0, 1], "maps": data["compare"]["maps"],
                          "limits": data["compare"]["limits"]})
    np.testing.assert_allclose(second, result.maps[:2] * 0.5, atol=float(result.maps.max()) / 500)
    with pytest.raises(InputError, match="same layers and heads"):
        build_explorer(result, compare=replace(other, layers=[0], grid_maps={"image": other.maps[:, :1]}))

    page = tmp_path / "cmp.html"
    assert cli_main(["explore", "--model", "tiny-llava", "--image", str(image_file), "--prompt", PROMPT,
                     "--max-new-tokens", "3", "--compare", "beam:num_beams=2", "--out", str(page), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    beam = tiny_llava.generate(image_file, PROMPT, max_new_tokens=3, decoding="beam:num_beams=2")
    assert summary["compare"]["text"] == beam.text
    data = embedded(page.read_text())
    assert data["compare"]["label"].startswith("beam:num_beams=2,") and data["compare"]["text"] == beam.text
