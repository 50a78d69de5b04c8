"""`vlmscope convert shikra` against the original Shikra code (fixture from tools/convert_parity/shikra_parity.py).

The fixture holds the original model's state-dict layout (names, shapes), its inputs and its outputs (logits of
every prompt position, 8 greedy tokens) on weights regenerated here from the names; the converted stock LLaVA
checkpoint must give the same logits (1e-4) and tokens.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from vlmscope.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "convert" / "shikra.json"
sys.path.insert(0, str(ROOT / "tools" / "convert_parity"))
from seeded import seeded_state_dict, seeded_tensor  # noqa: E402


@pytest.fixture(scope="module")
def fixture():
    return json.loads(FIXTURE.read_text())


def write_original_checkpoint(fixture: dict, root: Path) -> tuple[Path, Path]:
    """A merged Shikra checkpoint folder (config, weights in its layout, tokenizer) and a CLIP folder."""
    from vlmscope.models.tiny import build_tokenizer

    shikra, clip = root / "shikra", root / "clip"
    shikra.mkdir(parents=True)
    clip.mkdir()
    config = dict(fixture["shikra_config"], mm_vision_tower="openai/clip-vit-large-patch14")
    (shikra / "config.json").write_text(json.dumps(config))
    torch.save(seeded_state_dict(fixture["shikra_shapes"]), shikra / "pytorch_model.bin")
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<im_patch>", "<im_start>", "<im_end>"], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"]) == [62, 63, 64]
    tokenizer.save_pretrained(shikra)
    (clip / "config.json").write_text(json.dumps(fixture["clip_config"]))
    torch.save(seeded_state_dict(fixture["clip_shapes"]), clip / "pytorch_model.bin")
    return shikra, clip


@pytest.fixture(scope="module")
def converted(fixture, tmp_path_factory):
    from vlmscope.cli import main

    root = tmp_path_factory.mktemp("shikra")
    shikra, clip = write_original_checkpoint(fixture, root)
    out = root / "stock"
    assert main(["convert", "shikra", "--checkpoint", str(shikra), "--vision-tower", str(clip),
                 "--out", str(out)]) == 0
    return out


def test_converted_shikra_equals_the_original_code(fixture, converted):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(converted).eval()  # stock class, stock loading
    ids = torch.tensor([fixture["prompt_ids"]])
    pixel_values = seeded_tensor("pixel_values", [1, 3, 32, 32])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values).logits[0]
        greedy = model.generate(input_ids=ids, pixel_values=pixel_values, do_sample=False,
                                max_new_tokens=len(fixture["greedy_tokens"]))[0, ids.shape[1]:]
    expected = torch.tensor(fixture["logits"])
    assert (logits - expected).abs().max().item() < 1e-4
    assert greedy.tolist() == fixture["greedy_tokens"]


def test_converted_shikra_loads_in_vlmscope_with_its_template(fixture, converted):
    import vlmscope

    vlm = vlmscope.load(str(converted))
    assert vlm.adapter.family == "shikra"
    text = vlm.adapter.render_prompt("what is in the image ?")
    assert text.endswith("USER: <im_start><im_patch><im_end> what is in the image ? ASSISTANT:")
    from PIL import Image

    batch = vlm.encode([Image.new("RGB", (40, 24), (10, 200, 30))], ["what is in the image ?"])
    assert int(batch.image_mask.sum()) == 16
    # The <im_patch> run sits between <im_start> and <im_end>, as Shikra's forward requires.
    ids = batch.input_ids[0].tolist()
    start = ids.index(63)
    assert ids[start + 1:start + 17] == [62] * 16 and ids[start + 17] == 64


def test_shikra_adapter_pads_white_like_expand2square(tiny_shikra_vlm):
    from PIL import Image

    image = Image.new("RGB", (40, 24), (10, 200, 30))
    square = Image.new("RGB", (40, 40), (255, 255, 255))
    square.paste(image, (0, 8))  # Shikra's expand2square: centred, white
    batch = tiny_shikra_vlm.encode([image], ["what ?"])
    stock = tiny_shikra_vlm.processor(images=[square], text=[tiny_shikra_vlm.adapter.render_prompt("what ?")],
                                      return_tensors="pt")
    assert torch.equal(batch.model_inputs["pixel_values"], stock["pixel_values"])
    assert batch.image_sizes == [(40, 24)]
    grid = tiny_shikra_vlm.adapter.image_grids(batch, 0)[0]
    assert grid.region == pytest.approx((0.0, -8 / 24, 1.0, 1 + 8 / 24))


@pytest.fixture(scope="module")
def tiny_shikra_vlm():
    import vlmscope

    return vlmscope.load("tiny-shikra")


def test_convert_refuses_bad_inputs_and_writes_nothing(fixture, tmp_path, capsys):
    from vlmscope.cli import main

    shikra, clip = write_original_checkpoint(fixture, tmp_path / "orig")
    out = tmp_path / "out"
    cases = [
        ["--checkpoint", str(tmp_path / "missing"), "--vision-tower", str(clip)],
        ["--checkpoint", str(clip), "--vision-tower", str(clip)],  # a CLIP config is no Shikra config
        ["--checkpoint", str(shikra)],  # mm_vision_tower names a hub id, not a folder here
        ["--checkpoint", str(shikra), "--vision-tower", str(shikra)],  # no vision_model tensors
    ]
    for extra in cases:
        assert main(["convert", "shikra", *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1
        assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert", "shikra", "--checkpoint", str(shikra), "--vision-tower", str(clip),
                 "--out", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_convert_without_padding_is_plain_llava(fixture, tmp_path):
    import vlmscope
    from vlmscope.cli import main

    shikra, clip = write_original_checkpoint(fixture, tmp_path / "orig")
    out = tmp_path / "plain"
    assert main(["convert", "shikra", "--checkpoint", str(shikra), "--vision-tower", str(clip), "--out", str(out),
                 "--image-pad", "none"]) == 0
    vlm = vlmscope.load(str(out))
    assert vlm.adapter.family == "llava"  # OPERA's Shikra: the CLIP processor's resize and crop, no padding


@pytest.mark.parametrize("model", ["instructblip", "minigpt4", "shikra"])
def test_seed_scripts_take_the_seed_models(model):
    import argparse

    from vlmscope.eval.config import load_config
    from vlmscope.eval.seed_flags import add_seed_flags, eval_argv

    parser = argparse.ArgumentParser()
    add_seed_flags(parser)
    args = parser.parse_args(["--model", model, "--data-path", "COCO", "--beam", "5", "--scale_factor", "50"])
    argv = eval_argv("chair", args, [])
    config = argv[argv.index("--config") + 1]
    assert config == f"eval_configs/{model}.yaml"
    assert argv[argv.index("--decoding") + 1] == "opera:num_beams=5,scale_factor=50.0"
    loaded = load_config(ROOT / config)
    assert loaded is not None


def test_map_rejects_unknown_tensors():
    from vlmscope.models.convert.shikra import map_shikra_state_dict

    with pytest.raises(InputError):
        map_shikra_state_dict({"model.mm_projector.weight": torch.zeros(2, 2), "extra.weight": torch.zeros(1)}, {})


MINIGPT4_FIXTURE = ROOT / "tests" / "data" / "convert" / "minigpt4.json"


@pytest.fixture(scope="module")
def minigpt4_converted(tmp_path_factory):
    """MiniGPT-4's original files (BLIP-2 .pth, MiniGPT-4 .pth with llama_proj, a LLaMA folder), converted."""
    from transformers import LlamaConfig

    from vlmscope.cli import main
    from vlmscope.models.tiny import build_tokenizer

    fixture = json.loads(MINIGPT4_FIXTURE.read_text())
    root = tmp_path_factory.mktemp("minigpt4")
    weights = seeded_state_dict(fixture["shapes"])
    torch.save({"model": {k: v for k, v in weights.items() if not k.startswith("llama_proj.")}}, root / "blip2.pth")
    torch.save({"model": {k: v for k, v in weights.items() if k.startswith("llama_proj.")}}, root / "minigpt4.pth")
    llm = root / "vicuna"
    llm.mkdir()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")
    LlamaConfig(**{k: fixture["llama_config"][k] for k in keys}).save_pretrained(llm)
    torch.save(seeded_state_dict(fixture["llama_shapes"]), llm / "pytorch_model.bin")
    build_tokenizer().save_pretrained(llm)
    out = root / "stock"
    assert main(["convert", "minigpt4", "--checkpoint", str(root / "minigpt4.pth"), "--blip2", str(root / "blip2.pth"),
                 "--llm", str(llm), "--out", str(out), "--vision-heads", "4", "--qformer-heads", "4",
                 "--image-size", "32"]) == 0
    return fixture, out


def test_converted_minigpt4_equals_the_original_code(minigpt4_converted):
    import vlmscope

    fixture, out = minigpt4_converted
    vlm = vlmscope.load(str(out))  # sets ln_vision's eps (1e-5) on the stock post_layernorm
    model = vlm.model
    assert vlm.adapter.family == "blip2" and model.vision_model.post_layernorm.eps == 1e-5
    ids = torch.tensor([fixture["input_ids"]])
    pixel_values = seeded_tensor("pixel_values", [1, 3, 32, 32])
    with torch.no_grad():
        features = model.get_image_features(pixel_values).pooler_output[0]
        logits = model(input_ids=ids, pixel_values=pixel_values).logits[0]
        greedy = model.generate(input_ids=ids, pixel_values=pixel_values, do_sample=False,
                                max_new_tokens=len(fixture["greedy_tokens"]), eos_token_id=None)[0, ids.shape[1]:]
    assert (features - torch.tensor(fixture["query_features"])).abs().max().item() < 1e-4
    assert (logits - torch.tensor(fixture["logits"])).abs().max().item() < 1e-4
    assert greedy.tolist() == fixture["greedy_tokens"]
    from vlmscope.cli import main

    assert main(["convert", "minigpt4", "--checkpoint", str(out / "missing.pth"), "--out", str(out.parent / "x")]) == 2
    assert main(["convert", "minigpt4", "--checkpoint", str(out / "config.json"), "--out", str(out.parent / "x")]) == 2
    assert not (out.parent / "x").exists()  # no --llm: refused before anything is written
    text = vlm.adapter.render_prompt("what is in the image ?")
    assert text == f"###Human: <Img>{'<image>' * 8}</Img> what is in the image ? ###Assistant:"
