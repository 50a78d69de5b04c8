"""Attention maps against stock eager `generate(output_attentions=True)`, hand-known maps and numpy reductions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmscope
from vlmscope.api import VLM
from vlmscope.attention.engine import _text_config_names, active_plan
from vlmscope.cli import main as cli_main
from vlmscope.errors import InputError
from vlmscope.explain.maps import ExplainResult, explain

PROMPT = "what is in the image ?"


def make_image(width: int = 56, height: int = 40, seed: int = 0) -> Image.Image:
    # Smooth gradients plus noise: non-square so the centre-crop region is not the whole image.
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    return Image.fromarray((base + rng.rand(height, width, 3) * 55).astype("uint8"))


@pytest.fixture
def llava(tiny_llava: VLM) -> VLM:
    return tiny_llava  # the shared session model (conftest); tests that change a model build their own


def stock_last_rows(vlm: VLM, image: Image.Image, prompt: str, max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Stock eager generate: per step, every layer's last query row at the image columns [S, L, H, N]."""
    model = vlm.model
    batch = vlm.encode([image], [prompt])
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 **batch.model_inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 output_attentions=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation(previous)
    tokens = out.sequences[0, batch.input_ids.shape[1]:].tolist()
    cols = batch.image_mask[0].nonzero().flatten()
    rows = [np.stack([layer[0, :, -1, cols].float().numpy() for layer in out.attentions[s]])
            for s in range(len(tokens))]
    return tokens, np.stack(rows)


def test_maps_equal_stock_eager_attentions(llava: VLM) -> None:
    image = make_image()
    result = explain(llava, image, PROMPT, layers="1,3", heads="0,2", max_new_tokens=5)
    tokens, stock = stock_last_rows(llava, image, PROMPT, 5)
    assert result.token_ids == tokens
    assert result.maps.shape == (len(tokens), 2, 2, 4, 4)
    assert result.maps.dtype == np.float32
    expected = stock[:, [1, 3]][:, :, [0, 2]].reshape(len(tokens), 2, 2, 4, 4)
    np.testing.assert_allclose(result.maps, expected, atol=1e-5)
    # Step 0 is the prefill's last row and is included.
    assert result.steps[0] == 0 and len(result.steps) == len(tokens)
    assert result.tokens == [llava.adapter.tokenizer.decode([t]) for t in tokens]


def test_step_selection_keeps_the_right_token_labels(llava: VLM) -> None:
    image = make_image()
    full = explain(llava, image, PROMPT, layers=2, max_new_tokens=5)
    picked = explain(llava, image, PROMPT, steps="3,0", layers=2, max_new_tokens=5)
    assert picked.steps == [3, 0]
    np.testing.assert_allclose(picked.maps, full.maps[[3, 0]], atol=1e-7)
    assert picked.tokens == [full.tokens[3], full.tokens[0]]


def test_reductions_equal_numpy(llava: VLM) -> None:
    result = explain(llava, make_image(), PROMPT, max_new_tokens=4)
    maps = result.maps
    np.testing.assert_allclose(result.reduce("steps,heads"), maps.mean(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(result.reduce("layers,heads"), maps.mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(result.reduce("all"), maps.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(result.reduce("heads", op="max"), maps.max(axis=2), rtol=1e-6)
    np.testing.assert_allclose(result.reduce("none"), maps)
    assert result.reduce("steps", keepdims=True).shape == (1, *maps.shape[1:])
    with pytest.raises(InputError, match="unknown reduction"):
        result.reduce("tokens")


def test_uniform_attention_gives_the_known_map(tiny_vlm) -> None:
    # Zero query projection in layer 1: all logits are 0, so each query attends uniformly to its causal window.
    vlm = tiny_vlm("llava")
    with torch.no_grad():
        vlm.model.get_decoder().layers[1].self_attn.q_proj.weight.zero_()
    result = explain(vlm, make_image(), PROMPT, layers=1, max_new_tokens=4)
    prompt_len = len(result.prompt_ids)
    for i, step in enumerate(result.steps):
        expected = np.full((4, 4, 4), 1.0 / (prompt_len + step), dtype=np.float32)  # heads × grid
        np.testing.assert_allclose(result.maps[i, 0], expected, rtol=1e-5)


def test_next_and_qwen_grids_have_the_right_shapes_and_values(tiny_llava_next: VLM, tiny_qwen2_vl: VLM) -> None:
    image = make_image(64, 32)
    for arch, vlm in (("llava-next", tiny_llava_next), ("qwen2-vl", tiny_qwen2_vl)):
        result = explain(vlm, image, PROMPT, layers="0,3", max_new_tokens=3)
        grids = vlm.adapter.image_grids(vlm.encode([image], [PROMPT]), 0)
        tokens, stock = stock_last_rows(vlm, image, PROMPT, 3)
        assert result.token_ids == tokens
        for grid in grids:
            assert result.grid_maps[grid.name].shape == (3, 2, 4, grid.height, grid.width)
            np.testing.assert_allclose(result.grid_maps[grid.name], grid.take(stock[:, [0, 3]]), atol=1e-5)
        if arch == "llava-next":
            assert [g.name for g in result.grids] == ["base", "tiles"]
            assert result.maps.shape[-2:] == (4, 4)
            # Newline tokens (one per tile row) are left out of the tile grid.
            assert result.grid_maps["tiles"].shape[-1] == grids[1].row_stride - 1
        else:
            assert result.maps.shape[-2:] == (2, 4)


def test_bad_selections_raise_one_line_errors(llava: VLM) -> None:
    image = make_image()
    with pytest.raises(InputError, match=r"layer 9 is out of range: valid layers are 0\.\.3"):
        explain(llava, image, PROMPT, layers=9)
    with pytest.raises(InputError, match=r"head 4 is out of range: valid heads are 0\.\.3"):
        explain(llava, image, PROMPT, heads="1,4")
    with pytest.raises(InputError, match="step 7 is out of range"):
        explain(llava, image, PROMPT, steps="7", max_new_tokens=4)
    with pytest.raises(InputError, match="bad layer"):
        explain(llava, image, PROMPT, layers="x")


def test_step_beyond_the_generated_length_is_an_error(tiny_vlm) -> None:
    vlm = tiny_vlm("llava")
    model = vlm.model
    first = explain(vlm, make_image(), PROMPT, layers=0, max_new_tokens=2).token_ids
    # Make the second generated token an end-of-sequence token: generation stops after 2 tokens.
    model.generation_config.eos_token_id = first[1]
    with pytest.raises(InputError, match="beyond the 2 generated tokens"):
        explain(vlm, make_image(), PROMPT, steps="0,4", layers=0, max_new_tokens=6)
    assert _text_config_names(model) == {"text_config": "sdpa"}


def test_save_writes_arrays_json_and_overlays(llava: VLM, tmp_path) -> None:
    result = explain(llava, make_image(), PROMPT, layers="2-3", heads="0,1", max_new_tokens=3)
    written = result.save(tmp_path, reduce="layers,heads")
    data = np.load(tmp_path / "attention.npz")
    np.testing.assert_array_equal(data["maps"], result.maps)
    assert data["layers"].tolist() == [2, 3] and data["heads"].tolist() == [0, 1]
    assert data["steps"].tolist() == [0, 1, 2] and data["tokens"].tolist() == result.tokens
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["kind"] == "explain"
    assert run["text"] == result.text and run["token_ids"] == result.token_ids
    assert run["prompt_ids"] == result.prompt_ids and run["model"] == "tiny-llava"
    assert run["params"]["layers"] == [2, 3] and "generate_seconds" in run["runtime"]
    assert len(written["overlays"]) == 3 and (tmp_path / "steps.png").is_file()
    for path in written["overlays"]:
        with Image.open(path) as im:
            assert im.size[0] > 100
    # Per-map scale and no reduction: one overlay per (step, layer, head).
    out2 = tmp_path / "none"
    assert len(result.save(out2, reduce="none", scale="per-map")["overlays"]) == 3 * 2 * 2
    # The saved result loads back (by its kind) and reduces the same way.
    loaded = vlmscope.load_result(tmp_path, image=make_image())
    assert isinstance(loaded, ExplainResult) and loaded.provenance == run["provenance"]
    np.testing.assert_allclose(loaded.reduce("all"), result.reduce("all"))
    assert loaded.to_json() == {k: v for k, v in run.items() if k != "output"}
    # A re-run with fewer maps replaces the earlier overlays instead of mixing with them.
    assert len(result.save(out2, reduce="layers,heads")["overlays"]) == 3
    assert len(list(out2.glob("overlay_*.png"))) == 3
    assert result.plot(reduce="steps,layers").axes


def test_state_restored_after_an_exception(llava: VLM) -> None:
    model = llava.model
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    handle = model.get_decoder().layers[0].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            explain(llava, make_image(), PROMPT, layers=1, max_new_tokens=5)
    finally:
        handle.remove()
    assert active_plan() is None
    assert _text_config_names(model) == {"text_config": "sdpa"}
    tokens, stock = stock_last_rows(llava, make_image(), PROMPT, 3)
    again = explain(llava, make_image(), PROMPT, layers=1, max_new_tokens=3)
    assert again.token_ids == tokens
    np.testing.assert_allclose(again.maps[:, 0], stock[:, 1].reshape(-1, 4, 4, 4), atol=1e-5)


def test_cli_writes_files_and_exits_2_on_a_bad_layer(tmp_path, capsys) -> None:
    image_path = tmp_path / "img.png"
    make_image().save(image_path)
    out = tmp_path / "out"
    code = cli_main(["explain", "--model", "tiny-llava", "--image", str(image_path), "--prompt", PROMPT,
                     "--max-new-tokens", "3", "--layers", "1-2", "--heads", "0,3", "--reduce", "steps,heads",
                     "--out", str(out)])
    assert code == 0
    data = np.load(out / "attention.npz")
    assert data["maps"].shape == (3, 2, 2, 4, 4)
    assert sorted(p.name for p in out.glob("overlay_*.png")) == ["overlay_l01.png", "overlay_l02.png"]
    assert (out / "run.json").is_file() and (out / "steps.png").is_file()
    code = cli_main(["explain", "--model", "tiny-llava", "--image", str(image_path), "--prompt", PROMPT,
                     "--layers", "7", "--out", str(tmp_path / "bad")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: layer 7 is out of range: valid layers are 0..3"]
