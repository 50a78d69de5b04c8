"""The committed shapes model: loads offline with stock Auto classes and really sees (held-out scenes)."""

from __future__ import annotations

import os

import pytest
import torch

from vlmscope.shapes.build import CHAT_TEMPLATE, build_processor, build_tokenizer
from vlmscope.shapes.evaluate import (
    build_prompt,
    default_model_dir,
    evaluate_answers,
    evaluate_captions,
    generate,
    generate_scenes,
    pope_set,
)
from vlmscope.shapes.train import Encoder, pixel_values
from vlmscope.shapes.world import DEFAULT_CAPTION_PROMPT

MODEL_DIR = default_model_dir()
# Scenes from a seed the committed metrics were not measured on.
TEST_SEED = 2024


@pytest.fixture(scope="module")
def model_and_processor():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForImageTextToText.from_pretrained(str(MODEL_DIR), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(MODEL_DIR), local_files_only=True)
    model.eval()
    return model, processor


def test_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "chat_template.jinja", "generation_config.json", "TRAINING.md"):  # fmt: skip
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 20 * 1024 * 1024


def test_stock_classes_and_format(model_and_processor):
    model, processor = model_and_processor
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    assert processor.tokenizer.padding_side == "left"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size >= len(processor.tokenizer)
    assert processor.patch_size == model.config.vision_config.patch_size
    text = build_prompt(processor, "Describe the image.")
    assert text == "USER: <image>\nDescribe the image. ASSISTANT:"
    scene = generate_scenes(1, TEST_SEED)[0]
    batch = processor(images=[scene.image()], text=[text], return_tensors="pt")
    n_img = int((batch["input_ids"] == model.config.image_token_id).sum())
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert n_img == grid * grid == model.config.image_seq_length
    # The training script's shortcuts agree with the processor.
    assert torch.equal(batch["pixel_values"], pixel_values([scene]))
    enc = Encoder(processor.tokenizer)
    assert batch["input_ids"][0].tolist() == enc.prefix + enc.ids("Describe the image. ASSISTANT:")


def test_built_processor_matches_committed(model_and_processor):
    _, processor = model_and_processor
    assert processor.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert processor.chat_template == CHAT_TEMPLATE == build_processor().chat_template
    tok = processor.tokenizer
    ids = tok("A red circle, a blue square and an orange star.")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle , a blue square and an orange star ."


def test_heldout_quality(model_and_processor):
    model, processor = model_and_processor
    scenes = generate_scenes(30, TEST_SEED)
    images = [s.image() for s in scenes]
    captions = generate(model, processor, images, [DEFAULT_CAPTION_PROMPT] * len(scenes))
    cap = evaluate_captions(captions, scenes)
    assert cap["object_recall"] >= 0.9, (cap, captions)
    assert cap["object_precision"] >= 0.8, cap
    qs = pope_set(scenes, "adversarial", TEST_SEED) + pope_set(scenes, "random", TEST_SEED)
    answers = generate(model, processor, [images[i] for i, _ in qs], [q.text for _, q in qs], max_new_tokens=3)
    pope = evaluate_answers(answers, [bool(q.label) for _, q in qs])
    assert pope["accuracy"] >= 0.9, pope
    assert pope["unparseable"] == 0


def test_answers_end_with_eos(model_and_processor):
    model, processor = model_and_processor
    scene = generate_scenes(1, TEST_SEED + 1)[0]
    text = build_prompt(processor, DEFAULT_CAPTION_PROMPT)
    batch = processor(images=[scene.image()], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False)  # the saved generation config suffices
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    assert processor.tokenizer.eos_token_id in new
    assert processor.tokenizer.decode(new, skip_special_tokens=True).strip().endswith(".")
