"""The committed shapes model: loads offline with stock classes and through `vlmscope.load`, sees (held-out
quality), its localization heads point at the objects, and the CLI commands built on it work."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vlmscope.explain.pointing import peak_in_box, word_maps
from vlmscope.shapes import MODEL_DIR
from vlmscope.shapes.build import CHAT_TEMPLATE, build_processor, build_tokenizer
from vlmscope.shapes.evaluate import (
    CAPTION_TOKENS,
    chair_of,
    evaluate,
    heldout_scenes,
    pointing_game,
    pointing_targets,
)
from vlmscope.shapes.train import Encoder, pixel_values
from vlmscope.shapes.world import DEFAULT_CAPTION_PROMPT, existence_question

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Scenes from seeds the shipped metrics were not measured on (the README's figures use seed 1).
TEST_SEED = 2024


@pytest.fixture(scope="module")
def stock():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(MODEL_DIR), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(MODEL_DIR), local_files_only=True)
    return model, processor


@pytest.fixture
def vlm(shapes_vlm):
    return shapes_vlm  # the shared session model (conftest)


def test_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "chat_template.jinja", "generation_config.json", "TRAINING.md",
                 "training_run.json"):  # fmt: skip
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 20 * 1024 * 1024


def test_builtin_name():
    from vlmscope.models.loading import builtin_names
    from vlmscope.shapes import EXPLAIN_LAYER
    from vlmscope.shapes.train import POINTER_LAYER

    assert "shapes" in builtin_names()
    assert EXPLAIN_LAYER == POINTER_LAYER


def test_stock_classes_and_format(stock):
    model, processor = stock
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(model.model.vision_tower).__name__ == "CLIPVisionModel"
    assert type(model.model.language_model).__name__ == "LlamaModel"
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer.padding_side == "left"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "USER: <image>\nDescribe the image. ASSISTANT:"
    scene = heldout_scenes(1, TEST_SEED)[0]
    batch = processor(images=[scene.image()], text=[text], return_tensors="pt")
    n_img = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n_img == model.config.image_seq_length == 64
    # The training script's shortcuts agree with the processor.
    assert torch.equal(batch["pixel_values"], pixel_values([scene]))
    enc = Encoder(processor.tokenizer)
    assert batch["input_ids"][0].tolist() == enc.prefix + enc.ids("Describe the image. ASSISTANT:")
    # The processor shipped is the one `build` makes.
    assert processor.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert processor.chat_template == CHAT_TEMPLATE == build_processor().chat_template


def test_vlmscope_greedy_matches_stock_generate(stock, vlm):
    model, processor = stock
    scenes = heldout_scenes(3, TEST_SEED + 1)
    ours = vlm.generate([s.image() for s in scenes], [DEFAULT_CAPTION_PROMPT] * 3, max_new_tokens=CAPTION_TOKENS)
    text = vlm.adapter.render_prompt(DEFAULT_CAPTION_PROMPT)
    for scene, result in zip(scenes, ours):
        batch = processor(images=[scene.image()], text=[text], return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**batch, do_sample=False)  # the saved generation config suffices
        new = seq[0, batch["input_ids"].shape[1]:].tolist()
        assert result.token_ids == new
        assert new[-1] == processor.tokenizer.eos_token_id and result.text.endswith(".")


def test_heldout_quality(vlm):
    # The shipped figures (README) are on 200 scenes; here 30 fresh ones, with a small margin.
    m = evaluate(vlm, n=30, seed=TEST_SEED)
    assert m["object_recall"] >= 88.0, m
    assert m["pope_accuracy"] >= 88.0, m


def test_hallucination_is_there(vlm):
    # CHAIR_I must not be zero, or there is nothing for the steering methods to fix.
    scenes = heldout_scenes(100, 7)
    results = vlm.generate([s.image() for s in scenes], [DEFAULT_CAPTION_PROMPT] * len(scenes),
                           max_new_tokens=CAPTION_TOKENS)
    chair = chair_of([r.text for r in results], scenes)
    assert chair.metrics["CHAIR_I"] > 0, chair.metrics
    assert chair.metrics["CHAIR_I"] < 20, chair.metrics


def test_pointing_game(vlm):
    from vlmscope.explain.heads import rank_heads

    # Localization heads by the Kang et al. criteria (vlmscope.explain.heads) on a few scenes, then the
    # pointing game on others: the best of them puts its peak inside the named object's box >= 70 %.
    ranking = rank_heads(vlm, [s.image() for s in heldout_scenes(8, 11)], DEFAULT_CAPTION_PROMPT, top_k=3)
    heads = ranking.heads(3)
    assert heads, "no localization head found"
    scenes = heldout_scenes(20, 12)
    game = pointing_game(vlm, scenes, heads)
    assert game["n"] >= 40
    assert game["best_rate"] >= 0.7, game
    # Chance level: the share of grid cells whose centre lies in the box (a peak at a random cell).
    cells = [np.zeros((8, 8)) for _ in range(64)]
    for k, cell in enumerate(cells):
        cell.flat[k] = 1.0
    chance = np.mean([np.mean([peak_in_box(c, o.box, 64) for c in cells]) for s in scenes for o in s.objects])
    assert game["best_rate"] > 3 * chance, (game["best_rate"], chance)


def test_object_maps_match_stock_eager_attention(stock, vlm):
    # Independent oracle: the maps the pointing game reads equal stock eager attention probabilities.
    model, processor = stock
    scene = heldout_scenes(1, 13)[0]
    layer_heads = [(layer, head) for layer in range(vlm.adapter.num_layers) for head in (0, 1)]
    maps, regions = word_maps(vlm, scene.image(), pointing_targets(scene), layer_heads)
    assert regions == [(0.0, 0.0, 1.0, 1.0)] * len(scene.objects)
    model.set_attn_implementation("eager")
    try:
        for i, o in enumerate(scene.objects):
            text = vlm.adapter.render_prompt(existence_question(o.category))
            batch = processor(images=[scene.image()], text=[text], return_tensors="pt")
            with torch.no_grad():
                att = model(**batch, output_attentions=True).attentions
            ids = batch["input_ids"][0]
            pos = int((ids == processor.tokenizer.convert_tokens_to_ids(o.category)).nonzero()[-1])
            image_cols = (ids == model.config.image_token_id).nonzero().flatten()
            for k, (layer, head) in enumerate(layer_heads):
                expected = att[layer][0, head, pos, image_cols].reshape(8, 8).numpy()
                np.testing.assert_allclose(maps[i][k], expected, atol=1e-5)
    finally:
        model.set_attn_implementation("sdpa")


def test_shapes_eval_cli_json_equals_the_python_evaluator(vlm, capsys):
    from vlmscope.cli import main

    assert main(["shapes-eval", "--n", "3", "--seed", "5", "--decoding", "beam:num_beams=2", "--json"]) == 0
    captured = capsys.readouterr()
    try:
        metrics = json.loads(captured.out)  # pure JSON on stdout
    except json.JSONDecodeError:
        metrics = json.loads(captured.out.strip().splitlines()[-1])  # a table, then one JSON line
    # Oracle: the Python evaluator on the same scenes with the same method, one number at a time.
    expected = evaluate(vlm, n=3, seed=5, decoding="beam:num_beams=2")
    expected.pop("seconds")
    assert {k: metrics[k] for k in expected} == expected
    assert metrics["n"] == 3 and "beam" in str(metrics["decoding"])
    assert "scene 0:" in captured.out + captured.err


@pytest.mark.parametrize("argv", [["--n", "0"], ["--n", "2", "--decoding", "nosuch"],
                                  ["--n", "2", "--intervention", "pai:alpha=oops"]])
def test_shapes_eval_cli_bad_input(capsys, argv):
    from vlmscope.cli import main

    assert main(["shapes-eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")


@pytest.mark.slow  # about 20 s: CHAIR/POPE for five methods, heads, explain and flow on the shapes model
def test_demo_on_shapes(tmp_path):
    from vlmscope.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "shapes"
    assert {"greedy", "beam", "pai", "aai"} <= set(report["captions"]) == set(report["metrics"])
    page = (out / "report.html").read_text()
    figures = report["figures"] + report["heads"]["figures"]
    assert any("heads" in f for f in figures) and any("flow" in f for f in figures)
    for figure in figures:
        assert figure in page and (out / figure).is_file()
    assert report["heads"]["ranking"] and "pointing" in report["heads"]
