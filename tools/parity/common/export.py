"""Export the tiny parity model and its inputs for the reference runners (run in vlmscope's environment).

The parity model is `vlmscope.models.tiny.build_llava` with seed 0 and as many key/value heads as query heads (the
reference attention patches of 4.3x view keys with `num_heads`, so they need MHA). Its language model is written
as a stock `LlamaForCausalLM` checkpoint (config.json + model.safetensors) that transformers 4.29-4.37 load, and
for each case the merged input embeddings (text embeddings with the projected image features spliced in, which is
what the reference LLaVA class hands to `LlamaForCausalLM` after `prepare_inputs_labels_for_multimodal`).

Usage: python tools/parity/common/export.py WORKDIR [--cases 20]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_model import build_parity_vlm, case_image, case_prompt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--cases", type=int, default=20)
    args = parser.parse_args()
    out = Path(args.workdir)
    (out / "llama").mkdir(parents=True, exist_ok=True)
    vlm = build_parity_vlm()
    model = vlm.model
    text = model.config.text_config
    state = {}
    for name, tensor in model.model.language_model.state_dict().items():
        state[f"model.{name}"] = tensor.detach().contiguous().clone()
    state["lm_head.weight"] = model.lm_head.weight.detach().contiguous().clone()
    save_file(state, str(out / "llama" / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings, "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id,
        "torch_dtype": "float32",
    }
    (out / "llama" / "config.json").write_text(json.dumps(config, indent=1))
    cases, embeds = [], {}
    image_token = int(model.config.image_token_id)
    for index in range(args.cases):
        prompt = case_prompt(index)
        batch = vlm.encode([case_image(index)], [prompt])
        ids = batch.input_ids[0]
        with torch.no_grad():
            merged = model.model.get_input_embeddings()(batch.input_ids.clone().masked_fill(batch.image_mask, 0))
            features = model.model.get_image_features(pixel_values=batch.model_inputs["pixel_values"])
            features = getattr(features, "pooler_output", features)
            if isinstance(features, list | tuple):
                features = torch.cat(list(features), dim=0)
            merged[batch.image_mask] = features.reshape(-1, merged.shape[-1]).to(merged.dtype)
            # The merged embeddings must be those the 5.x model itself runs on.
            check = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_inputs)
            mine = model(inputs_embeds=merged, attention_mask=batch.attention_mask)
            assert torch.equal(check.logits, mine.logits), "merged embeddings differ from the model's own merge"
        positions = (ids == image_token).nonzero().flatten().tolist()
        uncond, _ = vlm.adapter.encode_text_only([prompt])
        reference_uncond = ids[ids != image_token].tolist()  # PAI: BOS + tokens(before image) + tokens(after)
        assert uncond[0].tolist() == reference_uncond, "image-free prompt differs from the reference's"
        embeds[f"case{index}"] = merged[0].contiguous()
        cases.append({"index": index, "prompt": prompt, "input_ids": ids.tolist(),
                      "img_start": positions[0], "img_end": positions[-1] + 1, "uncond_ids": reference_uncond})
    save_file(embeds, str(out / "embeds.safetensors"))
    (out / "cases.json").write_text(json.dumps({"eos_token_id": text.eos_token_id,
                                                "pad_token_id": text.pad_token_id, "cases": cases}, indent=1))
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    _ = np, Image
    main()
