"""`vlmscope tiny-model` output loads offline with stock Auto classes and with `vlmscope.load`."""

from __future__ import annotations

import pytest
import torch

import vlmscope
from vlmscope.cli import main


@pytest.mark.parametrize("arch", ["llava", "llava-next", "qwen2-vl"])
def test_saved_tiny_model_round_trip(arch, tmp_path, images, capsys):
    out = tmp_path / arch
    assert main(["tiny-model", "--arch", arch, "--out", str(out), "--seed", "3"]) == 0
    from transformers import AutoModelForImageTextToText

    stock = AutoModelForImageTextToText.from_pretrained(out).eval()
    vlm = vlmscope.load(str(out), device="cpu")
    assert type(stock) is type(vlm.model)
    for (name, a), b in zip(stock.state_dict().items(), vlm.model.state_dict().values()):
        assert torch.equal(a, b), name
    text = vlm.adapter.render_prompt("describe this image .")
    assert text.index("describe") > 0  # the image placeholder comes first
    result = vlm.generate(images[0], "describe this image .", max_new_tokens=6)
    assert len(result.token_ids) >= 1 and result.image_tokens > 0


def test_stock_auto_processor_loads_llava(tmp_path):
    from transformers import AutoProcessor

    main(["tiny-model", "--arch", "llava", "--out", str(tmp_path)])
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "LlavaProcessor"
    assert "<image>" in processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
    )


def test_seed_changes_weights():
    from vlmscope.models.tiny import build_tiny

    a, _ = build_tiny("llava", seed=0)
    b, _ = build_tiny("llava", seed=1)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
