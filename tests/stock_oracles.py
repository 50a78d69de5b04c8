"""Stock oracles shared by the end-to-end eval tests (CHAIR, POPE datasets, AMBER runs)."""

from __future__ import annotations

from pathlib import Path


def stock_greedy_text(image_path: str | Path, prompt: str, max_new: int) -> str:
    """Stock `generate` of the tiny LLaVA on one image, greedy, decoded as vlmscope decodes answers."""
    from PIL import Image

    import vlmscope

    vlm = vlmscope.load("tiny-llava")
    batch = vlm.encode([Image.open(image_path)], [prompt])
    out = vlm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs,
                             do_sample=False, max_new_tokens=max_new)
    return vlm.adapter.tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True).strip()
