"""LLaVA-OneVision, Gemma 3 and the generic adapter on tiny models: stock generate and stock eager attention as
oracles, image grids against the processor's token counts, and every cell of `vlmscope models`' table run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmscope
from vlmscope.api import VLM
from vlmscope.cli import main
from vlmscope.errors import InputError, UnsupportedModelError
from vlmscope.explain.maps import explain
from vlmscope.models.families_modern import CAPABILITIES, FAMILY_TABLE, GenericAdapter
from vlmscope.models.tiny import build_tiny

PROMPT = "describe this image ."


def _image(width: int = 56, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def onevision() -> VLM:
    return VLM(*build_tiny("llava-onevision"), "tiny-llava-onevision")


@pytest.fixture(scope="module")
def gemma3() -> VLM:
    return VLM(*build_tiny("gemma3"), "tiny-gemma3")


@pytest.fixture(scope="module")
def qwen3_vl() -> VLM:
    return VLM(*build_tiny("qwen3-vl"), "tiny-qwen3-vl")


@pytest.fixture(scope="module")
def idefics3() -> VLM:
    return VLM(*build_tiny("idefics3"), "tiny-idefics3")


@pytest.fixture(scope="module")
def smolvlm() -> VLM:
    return VLM(*build_tiny("smolvlm"), "tiny-smolvlm")


@pytest.fixture(scope="module")
def internvl() -> VLM:
    return VLM(*build_tiny("internvl"), "tiny-internvl")


@pytest.fixture(scope="module")
def generic() -> VLM:
    """The tiny OneVision model seen through the generic adapter (as an unknown family would be)."""
    vlm = VLM(*build_tiny("llava-onevision"), "tiny-llava-onevision")
    vlm.adapter = GenericAdapter(vlm.model, vlm.processor)
    return vlm


def _stock(vlm: VLM, image: Image.Image, max_new_tokens: int, **kwargs):
    inputs = vlm.processor(images=[image], text=[vlm.adapter.render_prompt(PROMPT)], return_tensors="pt")
    with torch.no_grad():
        out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True, output_scores=True, **kwargs)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), out, inputs


@pytest.mark.parametrize("name", ["onevision", "gemma3", "qwen3_vl", "idefics3", "smolvlm", "internvl", "generic"])
def test_greedy_and_beam_match_stock_generate(name, request):
    vlm = request.getfixturevalue(name)
    for image in (_image(), _image(32, 80, seed=1)):
        result = vlm.generate(image, PROMPT, max_new_tokens=8)
        ref, out, _ = _stock(vlm, image, 8)
        assert result.token_ids == ref
        ref_scores = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ref)]
        assert result.scores == pytest.approx(ref_scores, abs=1e-4)
        beam = vlm.generate(image, PROMPT, max_new_tokens=6, decoding="beam:num_beams=3")
        ref_beam, _, _ = _stock(vlm, image, 6, num_beams=3)
        assert beam.token_ids == ref_beam


def _stock_image_rows(vlm: VLM, image: Image.Image, steps: int) -> tuple[list[int], np.ndarray]:
    """Stock eager generate: per step, every layer's last query row at the image columns [S, L, H, N]."""
    batch = vlm.encode([image], [PROMPT])
    previous = vlm.model.config.text_config._attn_implementation
    vlm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = vlm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     **batch.model_inputs, max_new_tokens=steps, do_sample=False,
                                     output_attentions=True, return_dict_in_generate=True)
    finally:
        vlm.model.set_attn_implementation(previous)
    tokens = out.sequences[0, batch.input_ids.shape[1]:].tolist()
    cols = batch.image_mask[0].nonzero().flatten()
    rows = [np.stack([layer[0, :, -1, cols].float().numpy() for layer in out.attentions[s]])
            for s in range(len(tokens))]
    return tokens, np.stack(rows)


@pytest.mark.parametrize(("name", "layers"), [("onevision", [0, 3]), ("gemma3", [2]), ("qwen3_vl", [1, 3]),
                                               ("idefics3", [0, 2]), ("smolvlm", [1, 3]), ("internvl", [1, 3])])
def test_explain_grids_equal_stock_eager_attention(name, layers, request):
    vlm = request.getfixturevalue(name)
    image = _image(64, 32)
    result = explain(vlm, image, PROMPT, layers=",".join(map(str, layers)), max_new_tokens=3)
    tokens, stock = _stock_image_rows(vlm, image, 3)
    assert result.token_ids == tokens
    grids = vlm.adapter.image_grids(vlm.encode([image], [PROMPT]), 0)
    for grid in grids:
        np.testing.assert_allclose(result.grid_maps[grid.name], grid.take(stock[:, layers]), atol=1e-5)
    if name == "onevision":
        # 64×32 picks two tiles side by side: an 8-wide, 4-high tile grid (plus one newline column).
        assert [(g.name, g.height, g.width, g.row_stride) for g in grids] == [("base", 4, 4, 4), ("tiles", 4, 8, 9)]
    elif name == "gemma3":
        assert [(g.name, g.height, g.width) for g in grids] == [("image", 2, 2)]
    elif name == "internvl":
        # 64×32 px: a 2-wide, 1-high canvas, then the thumbnail; 2×2 tokens each.
        assert [(g.name, g.height, g.width, g.region) for g in grids] == [
            ("tile_r0_c0", 2, 2, (0.0, 0.0, 0.5, 1.0)), ("tile_r0_c1", 2, 2, (0.5, 0.0, 1.0, 1.0)),
            ("thumbnail", 2, 2, (0.0, 0.0, 1.0, 1.0))]
    elif name in ("idefics3", "smolvlm"):
        # 64×32 px: one row of two 32-px tiles, then the global view; 2×2 tokens each.
        assert [(g.name, g.height, g.width, g.region) for g in grids] == [
            ("tile_r0_c0", 2, 2, (0.0, 0.0, 0.5, 1.0)), ("tile_r0_c1", 2, 2, (0.5, 0.0, 1.0, 1.0)),
            ("global", 2, 2, (0.0, 0.0, 1.0, 1.0))]
    else:
        # 64×32 px, 8-px patches merged 2×2: a 2-high, 4-wide grid of merged tokens.
        assert [(g.name, g.height, g.width) for g in grids] == [("image", 2, 4)]


@pytest.mark.parametrize("size", [(56, 40), (32, 80), (90, 30), (64, 64), (33, 95)])
def test_onevision_grid_counts_match_the_processor_also_when_shrunk(size):
    # anyres_max_1: every image with more than one tile's worth of unpadded tokens is shrunk by the model.
    for ratio in ("anyres_max_4", "anyres_max_1"):
        vlm = VLM(*build_tiny("llava-onevision", vision_aspect_ratio=ratio), "tiny")
        batch = vlm.encode([_image(*size)], [PROMPT])
        grids = vlm.adapter.image_grids(batch, 0)  # raises when the counts disagree
        covered = sum(g.height * g.row_stride for g in grids)
        assert covered == int(batch.image_mask[0].sum())
        # The model agrees: its packed image features have exactly that many rows.
        with torch.no_grad():
            features = vlm.model.model.get_image_features(
                batch.model_inputs["pixel_values"], batch.model_inputs["image_sizes"],
                vision_aspect_ratio=ratio, batch_num_images=batch.model_inputs["batch_num_images"])
        packed = features.pooler_output if hasattr(features, "pooler_output") else features
        packed = torch.cat(list(packed)) if isinstance(packed, list | tuple) else packed
        assert packed.shape[0] == covered


def test_gemma3_sliding_layers_raise_and_full_layers_steer(gemma3):
    image = _image()
    assert gemma3.adapter.sliding_layers() == [0, 1, 3]
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        gemma3.generate(image, PROMPT, max_new_tokens=2, interventions=["pai:alpha=0.5"])
    with pytest.raises(UnsupportedModelError, match="sliding_window"):
        explain(gemma3, image, PROMPT, layers="1", max_new_tokens=2)
    with pytest.raises(UnsupportedModelError, match="full-attention"):
        gemma3.generate(image, PROMPT, max_new_tokens=2, decoding="opera:num_beams=2")
    # PAI on the full-attention layer 2 only changes the logits (a large alpha moves the first step).
    batch = gemma3.encode([image], [PROMPT])
    from vlmscope.decoding.session import GenerationRun
    from vlmscope.interventions import INTERVENTIONS

    def first_logits(specs):
        with torch.no_grad(), GenerationRun(gemma3.model, gemma3.adapter, batch,
                                            [INTERVENTIONS.parse(s) for s in specs]) as run:
            return run.prefill()

    base = first_logits([])
    with torch.no_grad():
        stock = gemma3.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             **batch.model_inputs).logits[:, -1]
    # Whether processed logits are raw or log-probabilities, their log-softmax must equal stock's.
    torch.testing.assert_close(torch.log_softmax(base.float(), -1), torch.log_softmax(stock.float(), -1),
                               atol=1e-4, rtol=1e-4)
    steered = first_logits(["pai:alpha=5.0,start=2,end=3"])
    assert not torch.allclose(base, steered)


def test_generic_adapter_equals_the_family_adapter_on_span_methods(onevision, generic):
    image = _image()
    for decoding, interventions in (("opera:num_beams=2", []), (None, ["pai:alpha=1.0"]), (None, ["vcd"]),
                                    (None, ["truncate:layer=1"]), (None, ["aai:reference=uniform,alpha=1.0"])):
        a = onevision.generate(image, PROMPT, max_new_tokens=5, decoding=decoding, interventions=interventions)
        b = generic.generate(image, PROMPT, max_new_tokens=5, decoding=decoding, interventions=interventions)
        assert a.token_ids == b.token_ids, (decoding, interventions)
    with pytest.raises(UnsupportedModelError, match="llava_onevision.*generic adapter.*no image grid"):
        explain(generic, image, PROMPT, layers="0", max_new_tokens=2)
    assert generic.adapter.family == "generic:llava_onevision"


# --- every cell of the family table ---------------------------------------------------------------------------
_FULL_LAYER = 2  # the tiny Gemma 3's full-attention layer


def _probe(vlm: VLM, capability: str, value: str) -> None:
    image = _image()
    full = "full layers" in value
    span = f",start={_FULL_LAYER},end={_FULL_LAYER + 1}" if full else ""
    if capability == "generate":
        vlm.generate(image, PROMPT, max_new_tokens=3)
    elif capability == "opera":
        vlm.generate(image, PROMPT, max_new_tokens=3, decoding="opera:num_beams=2")
    elif capability == "pai":
        vlm.generate(image, PROMPT, max_new_tokens=3, interventions=[f"pai:alpha=0.5{span}"])
    elif capability == "aai":
        reference = ",reference=uniform" if "uniform" in value else ""
        vlm.generate(image, PROMPT, max_new_tokens=3, interventions=[f"aai:alpha=0.5{reference}{span}"])
        if "uniform" in value:
            with pytest.raises(InputError, match="no vision reference"):
                vlm.generate(image, PROMPT, max_new_tokens=3, interventions=[f"aai:alpha=0.5{span}"])
    elif capability == "vcd":
        vlm.generate(image, PROMPT, max_new_tokens=3, interventions=["vcd"])
    elif capability == "truncate":
        vlm.generate(image, PROMPT, max_new_tokens=3, interventions=["truncate:layer=1"])
    elif capability == "fastv":
        # k=2: past the tiny Qwen3-VL's two DeepStack layers (k=1 there is refused, see the test below).
        vlm.generate(image, PROMPT, max_new_tokens=3, interventions=["fastv:k=2,ratio=0.5"])
    elif capability == "explain":
        explain(vlm, image, PROMPT, layers=str(_FULL_LAYER) if full else "all", max_new_tokens=2)
    elif capability == "flow":
        vlm.flow(image, PROMPT, max_new_tokens=2)
    elif capability == "heads":
        vlm.heads([image], PROMPT, top_k=2, min_layer=1)
    elif capability == "codebook":
        from vlmscope.codebook.features import check_family, span_layout

        check_family(vlm.adapter, "codebook")
        span_layout(vlm.adapter, vlm.encode([image], [PROMPT]), 0)
    else:  # pragma: no cover - the table and this probe must list the same capabilities
        raise AssertionError(capability)


_TABLE = {family: caps for family, _, _, caps in FAMILY_TABLE}
_ARCH = {"llava": "llava", "llava_next": "llava-next", "qwen2_vl": "qwen2-vl", "llava_onevision": "llava-onevision",
         "gemma3": "gemma3", "qwen3_vl": "qwen3-vl", "idefics3": "idefics3", "smolvlm": "smolvlm", "internvl": "internvl",
         "generic": "llava-onevision"}


@pytest.mark.parametrize("family", list(_TABLE))
def test_every_cell_of_the_family_table_holds(family):
    vlm = VLM(*build_tiny(_ARCH[family]), f"tiny-{family}")
    if family == "generic":
        vlm.adapter = GenericAdapter(vlm.model, vlm.processor)
    else:
        assert vlm.adapter.family == family
    assert set(_TABLE[family]) == set(CAPABILITIES)
    for capability in CAPABILITIES:
        value = _TABLE[family][capability]
        if value == "no":
            with pytest.raises(UnsupportedModelError):
                _probe(vlm, capability, value)
        else:
            _probe(vlm, capability, value)


def test_models_command_prints_the_table(capsys):
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["family"] for row in data["families"]] == list(_TABLE)
    assert data["capabilities"] == list(CAPABILITIES)
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["family", *CAPABILITIES]
    assert main(["models", "--markdown"]) == 0
    markdown = capsys.readouterr().out.strip()
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown in readme, "README's family table is out of date: paste `vlmscope models --markdown`"


@pytest.mark.parametrize("arch", ["llava-onevision", "gemma3", "qwen3-vl", "idefics3", "smolvlm", "internvl"])
def test_tiny_model_cli_loads_with_stock_classes_and_runs_opera_pai_explain(arch, tmp_path, capsys):
    out = tmp_path / arch
    assert main(["tiny-model", "--arch", arch, "--out", str(out), "--seed", "2"]) == 0
    from transformers import AutoModelForImageTextToText

    stock = AutoModelForImageTextToText.from_pretrained(out).eval()
    vlm = vlmscope.load(str(out), device="cpu")
    assert type(stock) is type(vlm.model)
    for (name, a), b in zip(stock.state_dict().items(), vlm.model.state_dict().values()):
        assert torch.equal(a, b), name
    image = tmp_path / "image.png"
    _image().save(image)
    capsys.readouterr()
    pai = "pai:alpha=0.5" if arch != "gemma3" else f"pai:alpha=0.5,start={_FULL_LAYER},end={_FULL_LAYER + 1}"
    assert main(["generate", "--model", str(out), "--image", str(image), "--prompt", PROMPT, "--max-new-tokens",
                 "3", "--intervention", pai, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    if arch != "gemma3":
        assert main(["generate", "--model", str(out), "--image", str(image), "--prompt", PROMPT,
                     "--max-new-tokens", "3", "--decoding", "opera:num_beams=2", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)
    maps = tmp_path / "maps"
    layer = "0" if arch != "gemma3" else str(_FULL_LAYER)
    assert main(["explain", "--model", str(out), "--image", str(image), "--prompt", PROMPT, "--layers", layer,
                 "--max-new-tokens", "2", "--out", str(maps)]) == 0
    assert (maps / "run.json").is_file() and list(maps.glob("*.png"))


def test_qwen3_vl_fastv_drop_before_deepstack_ends_is_refused_and_mask_mode_runs(qwen3_vl):
    image = _image()
    assert qwen3_vl.adapter.vision_fed_layers() == 2
    with pytest.raises(InputError, match="DeepStack.*k >= 2"):
        qwen3_vl.generate(image, PROMPT, max_new_tokens=2, interventions=["fastv:k=1,ratio=0.5"])
    masked = qwen3_vl.generate(image, PROMPT, max_new_tokens=4, interventions=["fastv:k=1,ratio=0.5,mode=mask"])
    # Past DeepStack, dropping and masking the same tokens give the same tokens (FastV's own equivalence).
    dropped = qwen3_vl.generate(image, PROMPT, max_new_tokens=4, interventions=["fastv:k=2,ratio=0.5"])
    masked2 = qwen3_vl.generate(image, PROMPT, max_new_tokens=4, interventions=["fastv:k=2,ratio=0.5,mode=mask"])
    assert dropped.token_ids == masked2.token_ids
    assert len(masked.token_ids) == 4


def _changed_tokens(vlm: VLM, clean: Image.Image, edited: Image.Image) -> np.ndarray:
    """Which image tokens' projected features differ between two images (bool, in image-token order)."""
    feats = []
    for image in (clean, edited):
        batch = vlm.encode([image], [PROMPT])
        inputs = {k: v for k, v in batch.model_inputs.items() if k != "batch_num_images"}
        with torch.no_grad():
            out = vlm.model.model.get_image_features(**inputs)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        out = torch.cat([o.reshape(-1, o.shape[-1]) for o in out]) if isinstance(out, list | tuple) else out
        feats.append(out.reshape(-1, out.shape[-1]))
    return ((feats[0] - feats[1]).abs().amax(-1) > 1e-6).numpy()


@pytest.mark.parametrize(("arch", "whole"), [("idefics3", "global"), ("smolvlm", "global"), ("internvl", "thumbnail")])
def test_tiles_lie_where_their_regions_say(arch, whole):
    # An edit inside the bottom-left quarter changes that tile's tokens and the whole-image view's, nothing else.
    vlm = VLM(*build_tiny(arch), f"tiny-{arch}")
    clean = _image(64, 64)
    edited = clean.copy()
    edited.paste((255, 0, 0), (4, 40, 20, 60))
    changed = _changed_tokens(vlm, clean, edited)
    grids = vlm.adapter.image_grids(vlm.encode([clean], [PROMPT]), 0)
    assert [g.name for g in grids] == ["tile_r0_c0", "tile_r0_c1", "tile_r1_c0", "tile_r1_c1", whole]
    hit = {g.name for g in grids if changed[g.indices()].any()}
    assert hit == {"tile_r1_c0", whole}
    assert changed[grids[2].indices()].all()


def test_onevision_tile_tokens_lie_where_the_grid_says():
    # 64×64 px → 2×2 tiles of 4×4 tokens; an edit inside the top-right tile changes exactly the top-right 4×4
    # block of the 8×8 tile grid (and base-view tokens), so the unpadded layout is row-major over the image.
    vlm = VLM(*build_tiny("llava-onevision"), "tiny-llava-onevision")
    clean = _image(64, 64)
    edited = clean.copy()
    edited.paste((255, 0, 0), (40, 4, 60, 20))
    changed = _changed_tokens(vlm, clean, edited)
    base, tiles = vlm.adapter.image_grids(vlm.encode([clean], [PROMPT]), 0)
    assert (tiles.height, tiles.width) == (8, 8)
    cells = changed[tiles.indices()]
    expected = np.zeros((8, 8), dtype=bool)
    expected[:4, 4:] = True
    np.testing.assert_array_equal(cells, expected)
    assert changed[base.indices()].any()


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_tiled_batch_of_different_layouts_equals_each_alone(name, request):
    # 2×2 tiles beside 1×2 (the processor pads the second input's views with empty ones), and SmolVLM's
    # processor takes one image list per prompt.
    vlm = request.getfixturevalue(name)
    images = [_image(56, 40), _image(64, 20, seed=1)]
    batch = vlm.encode(images, [PROMPT] * 2)
    assert [vlm.adapter.tile_layout(batch, row) for row in (0, 1)] == [(2, 2), (1, 2)]
    together = vlm.generate(images, [PROMPT] * 2, max_new_tokens=5)
    beams = vlm.generate(images, [PROMPT] * 2, max_new_tokens=3, decoding="opera:num_beams=2")
    for row, image in enumerate(images):
        assert together[row].token_ids == vlm.generate(image, PROMPT, max_new_tokens=5).token_ids
        assert beams[row].token_ids == vlm.generate(image, PROMPT, max_new_tokens=3,
                                                    decoding="opera:num_beams=2").token_ids


def test_internvl_packed_tiles_batch_beam_and_vcd_equal_each_alone(internvl):
    # Two images with different tile counts share one packed pixel tensor: beams and VCD's noise must follow
    # each input's own tiles (VCD's noise is drawn once per input, so a batch equals each input alone).
    images = [_image(64, 32), _image(40, 40, seed=3)]
    for kwargs in ({"decoding": "beam:num_beams=2"}, {"interventions": ["vcd"]}):
        batch = internvl.generate(images, [PROMPT, PROMPT], max_new_tokens=4, **kwargs)
        alone = [internvl.generate(image, PROMPT, max_new_tokens=4, **kwargs) for image in images]
        assert [r.token_ids for r in batch] == [r.token_ids for r in alone], kwargs
    encoded = internvl.encode(images, [PROMPT, PROMPT])
    assert internvl.adapter.packed_views_per_row(encoded) == [3, 1]
    # One draw per input over all its tiles: equal tiles come out differently noised (one draw per tile, as a
    # [B, C, H, W] tensor would get, repeats the same noise on every tile).
    from vlmscope.interventions.vcd import add_diffusion_noise, noised_model_inputs

    flat = torch.zeros(4, 3, 32, 32)
    noised = noised_model_inputs({"pixel_values": flat}, 500, 7, [3, 1])["pixel_values"]
    assert not torch.equal(noised[0], noised[1])
    torch.testing.assert_close(noised[:3], add_diffusion_noise(flat[:3], 500, 7))
    torch.testing.assert_close(noised[3:], add_diffusion_noise(flat[3:], 500, 7))


def _save_tiny_vipllava(out) -> None:
    """A family vlmscope has no adapter for (VipLlava), saved to disk with a LLaVA processor."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaProcessor,
        VipLlavaConfig,
        VipLlavaForConditionalGeneration,
    )

    from vlmscope.models.tiny import LLAVA_TEMPLATE, _scale_weights, _text_config, build_tokenizer

    tokenizer = build_tokenizer()
    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=32, patch_size=8),
        text_config=_text_config(tokenizer), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layers=[-2, -1], image_seq_length=16)
    torch.manual_seed(0)
    model = VipLlavaForConditionalGeneration(config).eval()
    _scale_weights(model, 8.0, tokenizer)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def test_an_unknown_family_loads_through_the_generic_adapter(tmp_path, capsys):
    _save_tiny_vipllava(tmp_path / "vip")
    vlm = vlmscope.load(str(tmp_path / "vip"), device="cpu")
    assert type(vlm.adapter) is GenericAdapter and vlm.adapter.family == "generic:vipllava"
    image = _image()
    ref, _, _ = _stock(vlm, image, 6)
    assert vlm.generate(image, PROMPT, max_new_tokens=6).token_ids == ref
    opera = vlm.generate(image, PROMPT, max_new_tokens=6, decoding="opera:num_beams=2")
    pai = vlm.generate(image, PROMPT, max_new_tokens=6, interventions=["pai:alpha=2.0,start=0"])
    assert len(opera.token_ids) >= 1 and pai.token_ids != ref  # a large PAI boost changes the answer
    with pytest.raises(UnsupportedModelError, match="vipllava.*no image grid"):
        explain(vlm, image, PROMPT, max_new_tokens=2)
    # The command line: exit 2 with the one-line reason, nothing written.
    image_file = tmp_path / "image.png"
    image.save(image_file)
    capsys.readouterr()
    code = main(["explain", "--model", str(tmp_path / "vip"), "--image", str(image_file), "--prompt", PROMPT,
                 "--out", str(tmp_path / "maps")])
    assert code == 2 and "generic adapter" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()
