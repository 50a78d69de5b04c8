"""The explorer page in a real browser: Playwright driving Debian's chromium (see scripts/setup.sh).

Clicking a token, switching layer and head, keyboard navigation; after each, the heat canvas the page shows is
read back pixel by pixel and decoded through the colormap to a level 0..255, which must equal the level of the
float map computed here from the saved result (`expected_map`, no quantisation) within the quantisation error.
A screenshot is kept under the test's tmp dir (and copied to $VLMSCOPE_SCREENSHOT_DIR when set).

Without chromium or Playwright the tests skip, except under CI=true, where they fail: CI must run them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmscope.explain.explorer import ALPHA_FLOOR, colormap_lut, expected_map, save_explorer
from vlmscope.explain.maps import ExplainResult, explain

CHROMIUM = os.environ.get("VLMSCOPE_CHROMIUM", "/usr/bin/chromium")
# Levels of tolerance: the page works on uint8-quantised maps (each to its own range) and the canvas may
# round premultiplied colours; 3 of 255 levels bounds both for these maps.
LEVEL_TOLERANCE = 3


def _missing(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: the browser test must run; install it with scripts/setup.sh)")
    pytest.skip(f"{why}: run scripts/setup.sh as root (apt-get install chromium; pip install playwright)")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed")
    if not Path(CHROMIUM).is_file():
        _missing(f"no chromium at {CHROMIUM}")
    with sync_playwright() as pw:
        # Root in a container has no user namespace for chromium's sandbox.
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def result(tiny_llava) -> ExplainResult:
    rng = np.random.RandomState(3)
    y, x = np.mgrid[0:60, 0:84]
    picture = np.stack([x * 3, y * 4, 255 - x * 2], -1) * 0.8 + rng.rand(60, 84, 3) * 50
    return explain(tiny_llava, Image.fromarray(picture.clip(0, 255).astype("uint8")), "what is in the image ?",
                   max_new_tokens=5)


LOCALIZATION = [(1, 0), (3, 2)]


@pytest.fixture
def page(browser, result, tmp_path):
    path = tmp_path / "explorer.html"
    save_explorer(result, path, localization_heads=LOCALIZATION)
    tab = browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    tab.goto(path.as_uri())
    yield tab
    tab.close()
    assert errors == [], errors


def shown_levels(tab) -> tuple[np.ndarray, np.ndarray]:
    """Levels of the heat canvas as shown: from the colour (nearest colormap entry) and from the opacity."""
    width, height, pixels = tab.evaluate("""() => {
        const c = document.getElementById('heat');
        return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
    }""")
    rgba = np.asarray(pixels, dtype=np.float64).reshape(height, width, 4)
    lut = np.asarray(colormap_lut(), dtype=np.float64)
    distance = ((rgba[..., None, :3] - lut[None, None]) ** 2).sum(-1)
    by_colour = distance.argmin(-1)
    by_alpha = (rgba[..., 3] - ALPHA_FLOOR) * 255 / (255 - ALPHA_FLOOR)
    return by_colour, by_alpha


def levels(maps: list[np.ndarray], index: int, scale: str = "shared") -> np.ndarray:
    """The level 0..255 of every cell of maps[index] on the page's colour scale."""
    pool = maps if scale == "shared" else [maps[index]]
    lo = min(0.0, min(float(m.min()) for m in pool))
    hi = max(float(m.max()) for m in pool)
    return np.round((maps[index] - lo) / (hi - lo) * 255)


def assert_shown(tab, result, step_index, layer="mean", head="mean", scale="shared") -> None:
    maps = [expected_map(result, s, layer, head, LOCALIZATION) for s in result.steps]
    want = levels(maps, step_index, scale)
    by_colour, by_alpha = shown_levels(tab)
    assert by_colour.shape == want.shape
    assert np.abs(by_alpha - want).max() <= LEVEL_TOLERANCE, (by_alpha, want)
    assert np.abs(by_colour - want).max() <= LEVEL_TOLERANCE, (by_colour, want)
    # The map is not flat: the check above could not pass by accident with a constant picture.
    assert want.max() - want.min() > 20


def test_click_token_shows_its_map(page, result) -> None:
    page.click(".tok >> nth=2")
    assert page.get_attribute("#heat", "data-step") == "2"
    assert "selected" in page.get_attribute(".tok >> nth=2", "class")
    assert_shown(page, result, 2)
    # Hover previews another token; leaving returns to the clicked one.
    page.hover(".tok >> nth=4")
    assert_shown(page, result, 4)
    page.mouse.move(1000, 780)
    assert page.get_attribute("#heat", "data-step") == "2"


def test_layer_head_and_scale_pickers(page, result, tmp_path) -> None:
    page.click(".tok >> nth=1")
    page.select_option("#layer", label="layer 3")
    page.select_option("#head", label="head 2")
    assert (page.get_attribute("#heat", "data-layer"), page.get_attribute("#heat", "data-head")) == ("3", "2")
    assert_shown(page, result, 1, 3, 2)
    page.select_option("#layer", label="max over layers")
    page.select_option("#head", label="mean over heads")
    assert_shown(page, result, 1, "max", "mean")
    page.select_option("#scale", "per-map")
    assert_shown(page, result, 1, "max", "mean", scale="per-map")
    page.select_option("#head", "localization")
    assert page.is_disabled("#layer")
    assert_shown(page, result, 1, head="localization", scale="per-map")
    # The legend states the value range of the shown scale.
    page.select_option("#head", label="head 0")
    maps = [expected_map(result, s, "max", 0) for s in result.steps]
    assert float(page.text_content("#legend-max")) == pytest.approx(maps[1].max(), abs=2e-3)
    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("VLMSCOPE_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["VLMSCOPE_SCREENSHOT_DIR"]) / "explorer.png")


def test_keyboard_steps_tokens_layers_and_heads(page, result) -> None:
    page.click(".tok >> nth=0")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#heat", "data-step") == "2"
    # Options: mean, max, layer 0..3 — two steps down from "mean" is layer 0, three is layer 1.
    page.focus("body")
    for _ in range(3):
        page.keyboard.press("ArrowDown")
    assert page.get_attribute("#heat", "data-layer") == "1"
    # Head options: mean, max, localization, head 0..3 — "]" four times from "mean" is head 1.
    for _ in range(4):
        page.keyboard.press("]")
    assert page.get_attribute("#heat", "data-head") == "1"
    assert_shown(page, result, 2, 1, 1)
    page.keyboard.press("ArrowLeft")
    assert page.get_attribute("#heat", "data-step") == "1"
    assert_shown(page, result, 1, 1, 1)


def test_flow_curves_and_hallucinated_marks(browser, result, tmp_path) -> None:
    from types import SimpleNamespace

    shares = {"image": [0.5, 0.4, 0.2, 0.1], "instruction": [0.3, 0.3, 0.5, 0.6]}
    flow = SimpleNamespace(layers=[0, 1, 2, 3], attention_shares=shares)
    path = tmp_path / "flow.html"
    save_explorer(result, path, flow=flow, hallucinated_steps=[1, 3])
    tab = browser.new_page()
    tab.goto(path.as_uri())
    assert tab.locator("#flow svg polyline").count() == 2
    assert tab.locator("#flow svg text[fill]").all_text_contents() == ["image", "instruction"]
    # The first curve falls, the second rises: y of the points (SVG y grows downwards).
    points = tab.get_attribute("#flow svg polyline >> nth=0", "points").split()
    ys = [float(p.split(",")[1]) for p in points]
    assert ys == sorted(ys) and len(ys) == 4
    marked = tab.locator(".tok.hallucinated")
    assert [marked.nth(i).get_attribute("data-step") for i in range(marked.count())] == ["1", "3"]
    tab.close()


def test_two_decodings_side_by_side_share_the_scale(browser, result, tmp_path) -> None:
    from dataclasses import replace

    other = replace(result, tokens=["x", "y", "z"], steps=[0, 1, 2], text="x y z",
                    grid_maps={"image": result.maps[:3][::-1] * 0.5})
    path = tmp_path / "compare.html"
    save_explorer(result, path, compare=other, labels=("greedy", "opera"), compare_hallucinated_steps=[2])
    tab = browser.new_page(viewport={"width": 1300, "height": 800})
    errors: list[str] = []
    tab.on("pageerror", lambda err: errors.append(str(err)))
    tab.goto(path.as_uri())
    assert tab.locator(".panel h2").all_text_contents() == ["greedy", "opera"]
    tab.click("#tokens-1 .tok >> nth=1")
    tab.select_option("#layer", label="layer 2")
    tab.select_option("#head", label="head 1")
    assert tab.get_attribute("#heat-1", "data-step") == "1"
    # Shared scale: one range over every token of both decodings.
    pool = [expected_map(r, s, 2, 1) for r in (result, other) for s in r.steps]
    lo, hi = min(0.0, min(m.min() for m in pool)), max(m.max() for m in pool)

    def levels_of(canvas: str) -> np.ndarray:
        width, height, pixels = tab.evaluate(f"""() => {{
            const c = document.getElementById('{canvas}');
            return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
        }}""")
        alpha = np.asarray(pixels, dtype=np.float64).reshape(height, width, 4)[..., 3]
        return (alpha - ALPHA_FLOOR) * 255 / (255 - ALPHA_FLOOR)

    want_other = np.round((expected_map(other, 1, 2, 1) - lo) / (hi - lo) * 255)
    want_main = np.round((expected_map(result, 0, 2, 1) - lo) / (hi - lo) * 255)
    assert np.abs(levels_of("heat-1") - want_other).max() <= LEVEL_TOLERANCE
    assert np.abs(levels_of("heat") - want_main).max() <= LEVEL_TOLERANCE
    assert want_other.max() - want_other.min() > 10
    # Arrows step the panel clicked last; the hallucinated word of the second answer is marked.
    tab.keyboard.press("ArrowRight")
    assert tab.get_attribute("#heat-1", "data-step") == "2"
    assert tab.get_attribute("#heat", "data-step") == "0"
    assert tab.locator("#tokens-1 .tok.hallucinated").all_text_contents() == ["z"]
    tab.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
    if os.environ.get("VLMSCOPE_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "compare.png", Path(os.environ["VLMSCOPE_SCREENSHOT_DIR"]) / "explorer_compare.png")
    tab.close()
    assert errors == [], errors
