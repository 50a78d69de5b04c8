"""Compatibility subset: every tiny family loads, generates, is steered and explained on the installed transformers.

scripts/compat.sh runs this file in a second environment holding the newest transformers 5.x release with torch,
torchvision and num2words (the main suite runs it on the pinned one, without torchvision). Oracles: stock
`AutoModelForImageTextToText` weights, stock `AutoProcessor` outputs (which need torchvision wherever the family's
processor has a video part), stock greedy `generate` and stock eager attention. The CLI end to end per family
(subprocesses) runs only in the compatibility job; the main suite covers the CLI in-process
(tests/test_families_modern.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import vlmscope
from vlmscope.explain.maps import carry_queries_to_patches, explain
from vlmscope.models.families_modern import VIDEO_PROCESSOR_TYPES
from vlmscope.models.tiny import ARCHS, VIDEO_PROCESSORS, save_tiny

# scripts/compat.sh sets this: there torchvision must be importable (under CI=true nothing may skip for want of
# it) and the CLI runs end to end per family.
IN_COMPAT_JOB = os.environ.get("VLMSCOPE_COMPAT_JOB") == "1"

PROMPT = "describe this image ."
# The tiny Gemma 3's one full-attention layer: PAI and explain are refused on its sliding-window layers.
_LAYER = {"gemma3": 2}


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=ARCHS)
def saved(request, tmp_path_factory) -> tuple[str, object]:
    arch = request.param
    out = save_tiny(arch, tmp_path_factory.mktemp(arch.replace("-", "_")) / "model", seed=1)
    return arch, vlmscope.load(str(out), device="cpu"), out


def _stock_greedy(vlm, image: Image.Image, steps: int, output_attentions: bool = False):
    batch = vlm.encode([image], [PROMPT])
    with torch.no_grad():
        out = vlm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 **batch.model_inputs, max_new_tokens=steps, do_sample=False,
                                 output_attentions=output_attentions, return_dict_in_generate=True)
    return batch, out, out.sequences[0, batch.input_ids.shape[1]:].tolist()


def test_loads_like_the_stock_auto_class(saved):
    arch, vlm, out = saved
    stock = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(stock) is type(vlm.model)
    ours = vlm.model.state_dict()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(tensor, ours[name]), name


def test_video_processor_is_named_so_stock_auto_processor_gets_past_the_config(saved):
    arch, _, out = saved
    config = json.loads((out / "processor_config.json").read_text())
    if arch not in VIDEO_PROCESSORS:
        assert "video_processor" not in config
        return
    video = config["video_processor"]
    assert video["video_processor_type"] == VIDEO_PROCESSORS[arch]
    assert hasattr(transformers, video["video_processor_type"])  # a stock class of this release
    image = config["image_processor"]
    assert {k: image[k] for k in ("size", "image_mean", "image_std") if k in image} == {
        k: video[k] for k in ("size", "image_mean", "image_std") if k in image}
    if transformers.utils.is_torchvision_available():
        processor = transformers.AutoProcessor.from_pretrained(out)
        assert type(processor.video_processor).__name__ == VIDEO_PROCESSORS[arch]
    else:
        # Without torchvision the stock loader now stops at transformers' own dependency check, not at a
        # missing config ("Can't load video processor"), which was the bug.
        with pytest.raises(ImportError, match="[Tt]orchvision"):
            transformers.AutoProcessor.from_pretrained(out)


def test_greedy_equals_stock_generate(saved):
    _, vlm, _ = saved
    result = vlm.generate(_image(), PROMPT, max_new_tokens=6)
    _, _, ref = _stock_greedy(vlm, _image(), 6)
    assert result.token_ids == ref


def test_forwards_pass_the_cache_under_the_installed_name(saved):
    # transformers 5.24 renamed `past_key_values` to `cache` and warns on the old name at every call; greedy,
    # OPERA and a contrast branch (VCD) cover every forward vlmscope makes with its own cache.
    arch, vlm, _ = saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vlm.generate(_image(), PROMPT, max_new_tokens=2)
        if arch != "gemma3":  # OPERA refuses Gemma 3 (the family table)
            vlm.generate(_image(), PROMPT, max_new_tokens=2, decoding="opera:num_beams=2")
        vlm.generate(_image(), PROMPT, max_new_tokens=2, interventions="vcd")
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_pai_steers_and_leaves_the_model_as_it_was(saved):
    arch, vlm, _ = saved
    layer = _LAYER.get(arch, 0)
    plain = vlm.generate(_image(), PROMPT, max_new_tokens=4)
    steered = vlm.generate(_image(), PROMPT, max_new_tokens=4,
                           interventions=f"pai:alpha=2.0,start={layer},end={layer + 1}")
    assert steered.scores[0] != pytest.approx(plain.scores[0], abs=1e-6)  # the hook reached the model
    again = vlm.generate(_image(), PROMPT, max_new_tokens=4)
    assert again.token_ids == plain.token_ids and again.scores == pytest.approx(plain.scores, abs=1e-6)


def test_explain_maps_equal_stock_eager_attention(saved):
    arch, vlm, _ = saved
    layer = _LAYER.get(arch, 1)
    result = explain(vlm, _image(), PROMPT, layers=str(layer), max_new_tokens=2)
    previous = vlm.model.config.text_config._attn_implementation
    vlm.model.set_attn_implementation("eager")
    try:
        batch, out, tokens = _stock_greedy(vlm, _image(), 2, output_attentions=True)
    finally:
        vlm.model.set_attn_implementation(previous)
    assert result.token_ids == tokens
    cols = batch.image_mask[0].nonzero().flatten()
    stock = np.stack([np.stack([a[0, :, -1, cols].float().numpy() for a in out.attentions[s]])
                      for s in range(len(tokens))])
    stock = stock[:, [layer]]
    grids = vlm.adapter.image_grids(batch, 0)
    if hasattr(vlm.adapter, "query_patch_attention"):
        # Q-Former families: the image columns are the queries, carried to the ViT patches as explain does
        # (test_seed_models.py checks that carrying).
        stock = carry_queries_to_patches(stock, vlm.adapter.query_patch_attention(batch)[0].cpu().numpy())
        grids = [vlm.adapter.patch_grid()]
    assert grids
    for grid in grids:
        np.testing.assert_allclose(result.grid_maps[grid.name], grid.take(stock), atol=1e-5)


# --- stock AutoProcessor against vlmscope's processors ----------------------------------------------------------
def _needs_torchvision(arch: str) -> None:
    """Skip a family whose stock processor has a video part when torchvision is absent (the main suite), except
    in the compatibility job under CI, where its absence is the failure."""
    available = transformers.utils.is_torchvision_available()
    if IN_COMPAT_JOB and os.environ.get("CI") == "true":
        assert available, "the compatibility venv must have torchvision (scripts/compat.sh installs it)"
    if not available and arch in VIDEO_PROCESSORS:
        pytest.skip(f"stock AutoProcessor of {arch} builds its {VIDEO_PROCESSORS[arch]}, which needs torchvision "
                    "(scripts/compat.sh has it)")


def _encoded(vlm, image: Image.Image) -> dict[str, object]:
    batch = vlm.encode([image], [PROMPT])
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.model_inputs}


def _assert_same_inputs(stock: dict, ours: dict, what: str) -> None:
    assert set(stock) == set(ours), f"{what}: keys differ"
    for key, value in stock.items():
        mine = ours[key]
        if isinstance(value, torch.Tensor):
            assert value.shape == mine.shape and value.dtype == mine.dtype, f"{what}: {key}"
            assert torch.equal(value, mine), f"{what}: {key} differs"
        else:
            assert value == mine, f"{what}: {key}"


@pytest.mark.parametrize("size", [(56, 40), (32, 80)])
def test_stock_auto_processor_equals_vlmscope_encode(saved, size, monkeypatch):
    arch, vlm, out = saved
    _needs_torchvision(arch)
    stock = transformers.AutoProcessor.from_pretrained(out)  # video processor and all
    if arch in VIDEO_PROCESSORS:
        assert type(stock.video_processor).__name__ == VIDEO_PROCESSORS[arch]
    # The same stock processor with the PIL image processor, which vlmscope's tiny processors and every
    # install without torchvision use (stock AutoProcessor itself picks the torchvision one here).
    stock_pil = transformers.AutoProcessor.from_pretrained(
        out, image_processor=transformers.AutoImageProcessor.from_pretrained(out, backend="pil"))
    assert type(stock_pil) is type(stock)
    image = _image().resize(size)
    text = vlm.adapter.render_prompt(PROMPT)
    if getattr(stock, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        assert stock.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    stock_image = image
    if arch == "shikra":
        # vlmscope's Shikra adapter pads to a white square before the stock processor (Shikra's Expand2square);
        # the stock processor alone does not, so it gets the padded image.
        from vlmscope.models.families_seed import expand_to_square

        stock_image = expand_to_square(image, tuple(int(c) for c in vlm.model.config.shikra_pad_color))

    def run(processor: object) -> dict:
        return dict(processor(images=[stock_image], text=[text], return_tensors="pt", padding=True,
                              padding_side="left"))

    expected, expected_pil = run(stock), run(stock_pil)
    # 1) the processor vlmscope builds in-process for `tiny-<arch>` (image-only, PIL image processor);
    builtin = vlmscope.load(f"tiny-{arch}", device="cpu")
    _assert_same_inputs(expected_pil, _encoded(builtin, image), f"{arch}: built-in tiny processor")
    # 2) `vlmscope.load(dir)` as it runs without torchvision: stock AutoProcessor stops at the video processor,
    # and the families that have one fall back to their image-only processor (loading.load_processor).
    model_type = vlm.model.config.model_type
    if arch in VIDEO_PROCESSORS:
        assert model_type in VIDEO_PROCESSOR_TYPES or model_type in ("qwen2_vl", "qwen2_5_vl")

        def no_torchvision(*args: object, **kwargs: object) -> None:
            raise ImportError(f"{VIDEO_PROCESSORS[arch]} requires the Torchvision library")

        monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", no_torchvision)
        fallback = vlmscope.load(str(out), device="cpu")
        monkeypatch.undo()
        assert getattr(fallback.processor, "video_processor", None) is None
        # Its image processor is AutoImageProcessor's choice (the Qwen2-VL fallback always takes the PIL one):
        # compared with the stock processor of the same backend.
        backend = type(fallback.processor.image_processor)
        assert backend in (type(stock.image_processor), type(stock_pil.image_processor))
        reference = expected if backend is type(stock.image_processor) else expected_pil
        _assert_same_inputs(reference, _encoded(fallback, image), f"{arch}: image-only fallback of vlmscope.load")
    # 3) `vlmscope.load(dir)` as it is here (stock AutoProcessor where it loads).
    _assert_same_inputs(expected, _encoded(vlm, image), f"{arch}: vlmscope.load")
    # The two stock backends agree on everything but the pixel rounding: PIL rounds the resized image to uint8,
    # torchvision keeps floats (and clamps bicubic overshoot differently), a few grey levels at most on this
    # noise image and under one on average; a wrong tile order or crop would differ by tens on average.
    assert set(expected) == set(expected_pil)
    std = stock.image_processor.image_std
    grey = 1 / 255 / min(std if isinstance(std, list | tuple) else [std])
    for key, value in expected.items():
        other = expected_pil[key]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert value.shape == other.shape
            assert float((value - other).abs().mean()) < grey, f"{arch}: {key} backends differ on average"
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, other), f"{arch}: {key}"


# --- the CLI end to end, every family (compatibility job only) --------------------------------------------------
# One fresh interpreter runs every command through the CLI's entry point, each with its own stdout and stderr
# (a separate interpreter per command costs about 5 s of imports each: 48 of them would take minutes).
_DRIVER = """
import contextlib, io, json, sys
from vlmscope.cli import main
results = []
for argv in json.load(open(sys.argv[1])):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append({"argv": argv, "returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, open(sys.argv[2], "w"))
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def _commands(arch: str, root: Path, image: Path) -> dict[str, list[str]]:
    layer = _LAYER.get(arch, 0)
    model = root / arch / "model"
    common = ["--model", str(model), "--image", str(image), "--prompt", PROMPT, "--device", "cpu"]
    return {
        # seed 1, as the `saved` fixture: the same weights, so in-process runs are the oracle.
        "tiny-model": ["tiny-model", "--arch", arch, "--out", str(model), "--seed", "1"],
        "opera": ["generate", *common, "--max-new-tokens", "3", "--decoding", "opera:num_beams=2", "--json"],
        "pai": ["generate", *common, "--max-new-tokens", "3", "--intervention",
                f"pai:alpha=0.5,start={layer},end={layer + 1}", "--json"],
        "explain": ["explain", *common, "--max-new-tokens", "2", "--layers", str(layer),
                    "--out", str(root / arch / "maps")],
    }


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> tuple[Path, dict[str, dict[str, dict]]]:
    if not IN_COMPAT_JOB:
        pytest.skip("the CLI per family runs in scripts/compat.sh (VLMSCOPE_COMPAT_JOB=1); "
                    "tests/test_families_modern.py covers the CLI in-process")
    root = tmp_path_factory.mktemp("cli")
    image = root / "image.png"
    _image().save(image)
    plan = [(arch, name, argv) for arch in ARCHS for name, argv in _commands(arch, root, image).items()]
    (root / "plan.json").write_text(json.dumps([argv for _, _, argv in plan]))
    run = _python("-c", _DRIVER, str(root / "plan.json"), str(root / "results.json"))
    assert run.returncode == 0, run.stderr
    results = json.loads((root / "results.json").read_text())
    runs: dict[str, dict[str, dict]] = {}
    for (arch, name, _), result in zip(plan, results, strict=True):
        runs.setdefault(arch, {})[name] = result
    return root, runs


def test_cli_generates_with_opera_and_pai_and_explains_onto_the_image(saved, cli_runs):
    arch, vlm, _ = saved
    root, runs = cli_runs
    run = runs[arch]
    assert run["tiny-model"]["returncode"] == 0, run["tiny-model"]["stderr"]
    for name in ("pai", "opera"):
        result = run[name]
        if name == "opera" and arch == "gemma3":
            # The family table's "no": OPERA needs a full KV cache; Gemma 3's sliding layers keep a window.
            assert result["returncode"] == 2 and result["stdout"] == "", result["stderr"]
            errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "OPERA" in errors[0]
            continue
        assert result["returncode"] == 0, f"{arch} {name}: {result['stderr']}"
        record = json.loads(result["stdout"])  # --json: only JSON on stdout
        assert 1 <= len(record["token_ids"]) <= 3
        if name == "opera":
            assert record["decoding"].startswith("opera:num_beams=2,") and "opera" in record["extras"]
            reference = vlm.generate(_image(), PROMPT, max_new_tokens=3, decoding=record["decoding"])
        else:
            assert [spec.split(",")[0] for spec in record["interventions"]] == ["pai:alpha=0.5"]
            reference = vlm.generate(_image(), PROMPT, max_new_tokens=3, interventions=record["interventions"])
        assert record["token_ids"] == reference.token_ids  # the same run in-process, from the spec strings
    result = run["explain"]
    assert result["returncode"] == 0, f"{arch} explain: {result['stderr']}"
    maps = root / arch / "maps"
    assert json.loads((maps / "run.json").read_text())["kind"] == "explain"
    assert list(maps.glob("*.png")), "no overlays on the image"
    # The saved maps are the in-process explain's, which test_explain_maps_equal_stock_eager_attention holds
    # to stock eager attention.
    layer = _LAYER.get(arch, 0)
    reference = explain(vlm, _image(), PROMPT, layers=str(layer), max_new_tokens=2)
    loaded = vlmscope.load_result(maps)
    assert loaded.token_ids == reference.token_ids
    assert set(loaded.grid_maps) == set(reference.grid_maps)
    for name, grid_map in reference.grid_maps.items():
        np.testing.assert_allclose(loaded.grid_maps[name], grid_map, atol=1e-6)


def test_cli_json_stdout_is_only_json_in_a_real_process(cli_runs):
    # The driver captures sys.stdout; a real `python -m vlmscope` also has transformers' warnings and loading
    # bars around, which must go to stderr.
    root, _ = cli_runs
    argv = _commands("smolvlm", root, root / "image.png")["opera"]
    run = _python("-m", "vlmscope", *argv)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"]
