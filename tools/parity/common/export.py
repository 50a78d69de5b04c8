"""Export the tiny parity model and its inputs for the reference runners (run in vlmscope's environment).

The parity model is `vlmscope.models.tiny.build_llava` with seed 0 and as many key/value heads as query heads (the
reference attention patches of 4.3x view keys with `num_heads`, so they need MHA). Its language model is written
as a stock `LlamaForCausalLM` checkpoint (config.json + model.safetensors) that transformers 4.29-4.37 load, and
for each case the merged input embeddings (text embeddings with the projected image features spliced in, which is
what the reference LLaVA class hands to `LlamaForCausalLM` after `prepare_inputs_labels_for_multimodal`).

Usage: python tools/parity/common/export.py WORKDIR [--cases 20] [--model default|truncation]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_model import PARITY_MODELS, case_image, case_prompt  # noqa: E402


def _export_llava_layout(vlm, out: Path) -> None:
    model = vlm.model
    vision = model.config.vision_config
    (out / "clip").mkdir(exist_ok=True)
    # 5.x keeps the CLIP transformer's parameters without the `vision_model.` prefix of 4.x checkpoints.
    tower = {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v.detach().contiguous().clone()
             for k, v in model.model.vision_tower.state_dict().items()}
    save_file(tower, str(out / "clip" / "model.safetensors"), metadata={"format": "pt"})
    (out / "clip" / "config.json").write_text(json.dumps({
        "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
        "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_hidden_layers, "num_attention_heads": vision.num_attention_heads,
        "num_channels": vision.num_channels, "image_size": vision.image_size, "patch_size": vision.patch_size,
        "hidden_act": vision.hidden_act, "layer_norm_eps": vision.layer_norm_eps,
        "projection_dim": getattr(vision, "projection_dim", 512), "torch_dtype": "float32"}, indent=1))
    # The reference's CLIPVisionTower loads an image processor from the same folder (unused: pixels come ready).
    processor = vlm.processor.image_processor
    (out / "clip" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": vision.image_size},
        "do_center_crop": True, "crop_size": {"height": vision.image_size, "width": vision.image_size},
        "do_normalize": True, "image_mean": list(processor.image_mean), "image_std": list(processor.image_std),
        "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True, "resample": 3}, indent=1))
    (out / "llava").mkdir(exist_ok=True)
    state = {f"model.{k}": v.detach().contiguous().clone()
             for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight.detach().contiguous().clone()
    projector = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "gelu" and model.config.vision_feature_layer == -2
    for ours, theirs in (("linear_1", "0"), ("linear_2", "2")):
        for part in ("weight", "bias"):
            state[f"model.mm_projector.{theirs}.{part}"] = getattr(getattr(projector, ours), part).detach().clone()
    save_file(state, str(out / "llava" / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "llama" / "config.json").read_text())
    config.update({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
                   "mm_vision_tower": str((out / "clip").resolve()), "mm_vision_select_layer": -2,
                   "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
                   "mm_hidden_size": vision.hidden_size, "mm_use_im_start_end": False,
                   "mm_use_im_patch_token": False, "use_mm_proj": True, "image_aspect_ratio": "square"})
    (out / "llava" / "config.json").write_text(json.dumps(config, indent=1))


def _export_llava_hf_4x(vlm, out: Path) -> None:
    """The llava-hf layout of transformers 4.3x-4.4x (`llava_hf/`): language_model.* / vision_tower.* /
    multi_modal_projector.* keys and a config without 5.x-only fields (FastV's llava-hf fork is 4.39.0.dev0)."""
    model = vlm.model
    folder = out / "llava_hf"
    folder.mkdir(exist_ok=True)
    state = {f"language_model.model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["language_model.lm_head.weight"] = model.lm_head.weight
    for k, v in model.model.vision_tower.state_dict().items():
        state[f"vision_tower.{k if k.startswith('vision_model.') else 'vision_model.' + k}"] = v
    for k, v in model.model.multi_modal_projector.state_dict().items():
        state[f"multi_modal_projector.{k}"] = v
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    text = json.loads((out / "llama" / "config.json").read_text())
    vision = json.loads((out / "clip" / "config.json").read_text())
    for cfg in (text, vision):
        cfg.pop("architectures", None)
        cfg.pop("torch_dtype", None)
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "text_config": text, "vision_config": vision, "image_token_index": int(model.config.image_token_id),
              "projector_hidden_act": model.config.projector_hidden_act, "vision_feature_layer": -2,
              "vision_feature_select_strategy": "default", "vocab_size": text["vocab_size"],
              "pad_token_id": text["pad_token_id"], "ignore_index": -100, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--model", choices=sorted(PARITY_MODELS), default="default")
    args = parser.parse_args()
    out = Path(args.workdir)
    (out / "llama").mkdir(parents=True, exist_ok=True)
    builder, image_size = PARITY_MODELS[args.model]
    vlm = builder()
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
    _export_llava_layout(vlm, out)
    _export_llava_hf_4x(vlm, out)
    cases, embeds, pixels = [], {}, {}
    image_token = int(model.config.image_token_id)
    for index in range(args.cases):
        prompt = case_prompt(index)
        batch = vlm.encode([case_image(index, image_size)], [prompt])
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
        pixels[f"case{index}"] = batch.model_inputs["pixel_values"][0].contiguous()
        cases.append({"index": index, "prompt": prompt, "input_ids": ids.tolist(),
                      "img_start": positions[0], "img_end": positions[-1] + 1, "uncond_ids": reference_uncond})
    save_file(embeds, str(out / "embeds.safetensors"))
    save_file(pixels, str(out / "pixels.safetensors"))
    (out / "cases.json").write_text(json.dumps({"model": args.model, "image_size": image_size,
                                                "eos_token_id": text.eos_token_id,
                                                "pad_token_id": text.pad_token_id, "cases": cases}, indent=1))
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
