"""Shikra (shikras/shikra, merged 7B) → a stock `LlavaForConditionalGeneration` checkpoint, exactly.

Shikra is LLaMA with CLIP ViT-L/14 features of the penultimate layer (CLS dropped) put through one linear map
(`model.mm_projector`) into the places of the `<im_patch>` tokens between `<im_start>` and `<im_end>`. Its
checkpoint holds the language model and the projector; the vision tower is loaded from `mm_vision_tower`
(openai/clip-vit-large-patch14), which is why the converter takes it separately.

Stock LLaVA computes `linear_2(act(linear_1(x)))`: with `projector_hidden_act="linear"` (the identity),
`linear_1` = Shikra's projector and `linear_2` = the identity matrix with zero bias, this is Shikra's map
(multiplying by I is exact in floating point). The image token is `<im_patch>`, so the stock processor
expands it to the 256 patch tokens and the chat template writes `<im_start><im_patch><im_end>` as Shikra's
conversation code does (Vicuna v1.1: system prompt, `USER: ... ASSISTANT:`).

Shikra pads non-square images to a square with white (its `Expand2square`) before CLIP's resize and crop;
the stock LLaVA processor pads with the CLIP mean colour, so the converted config records the colour
(`shikra_pad_color`) and vlmscope's Shikra adapter pads with it before the stock processor. OPERA and PAI
evaluate Shikra without that padding (`image_pad="none"`: a plain LLaVA checkpoint, no colour recorded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.models.convert._io import read_config, read_state_dict

LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act", "initializer_range",
              "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_theta")
SHIKRA_PAD_COLOR = (255, 255, 255)
IMAGE_PADS = ("white", "none")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _vision_config(folder: Path) -> Any:
    from transformers import CLIPConfig, CLIPVisionConfig

    raw = read_config(folder, "--vision-tower")
    if raw.get("model_type") == "clip" or "vision_config" in raw:
        return CLIPConfig(**raw).vision_config
    return CLIPVisionConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})


def map_shikra_state_dict(shikra: dict[str, torch.Tensor], clip: dict[str, torch.Tensor],
                          vision_prefix: str = "model.vision_tower.") -> dict[str, torch.Tensor]:
    """Shikra's and CLIP's tensors under the stock LLaVA names (plus the identity second projector layer).

    `vision_prefix` replaces CLIP's `vision_model.` (the stock LLaVA of this transformers version holds the
    vision transformer's modules directly under `model.vision_tower.`)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in shikra.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if key.startswith("model.mm_projector."):
            out["model.multi_modal_projector.linear_1." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("model."):
            out["model.language_model." + key[len("model."):]] = value
        elif key == "lm_head.weight":
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise InputError(f"unexpected tensors in the Shikra checkpoint: {', '.join(sorted(unknown)[:5])}")
    if "model.multi_modal_projector.linear_1.weight" not in out:
        raise InputError("the checkpoint has no model.mm_projector: it is not a merged Shikra checkpoint")
    for key, value in clip.items():
        if key.startswith("vision_model.") and not key.endswith("position_ids"):
            out[vision_prefix + key[len("vision_model."):]] = value
    if not any(k.startswith("model.vision_tower.") for k in out):
        raise InputError("--vision-tower has no vision_model.* tensors: point to a CLIP checkpoint")
    hidden = out["model.multi_modal_projector.linear_1.weight"].shape[0]
    dtype = out["model.multi_modal_projector.linear_1.weight"].dtype
    out["model.multi_modal_projector.linear_2.weight"] = torch.eye(hidden, dtype=dtype)
    out["model.multi_modal_projector.linear_2.bias"] = torch.zeros(hidden, dtype=dtype)
    return out


def convert_shikra(checkpoint: str | Path, out: str | Path, vision_tower: str | Path | None = None,
                   dtype: torch.dtype | None = None, image_pad: str = "white") -> Path:
    """Write a stock LLaVA checkpoint (model, tokenizer, processor with Shikra's template) to `out`.

    `image_pad`: "white" pads images to a square as the original Shikra does; "none" feeds them to the CLIP
    processor as they are (shortest-side resize and centre crop), as OPERA's and PAI's Shikra evaluations do.
    """
    if image_pad not in IMAGE_PADS:
        raise InputError(f"image_pad {image_pad!r}: use one of {', '.join(IMAGE_PADS)}")
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlamaConfig, LlavaForConditionalGeneration

    from vlmscope.models.tiny_seed import shikra_llava_config, shikra_processor

    checkpoint = Path(checkpoint)
    raw = read_config(checkpoint, "--checkpoint")
    if "mm_hidden_size" not in raw:
        raise InputError(f"{checkpoint} is not a Shikra checkpoint (its config.json has no mm_hidden_size)")
    vision_dir = Path(vision_tower) if vision_tower is not None else Path(str(raw.get("mm_vision_tower", "")))
    if not vision_dir.is_dir():
        raise InputError(f"--vision-tower: give the folder of the CLIP model Shikra was trained with (its config "
                         f"names {raw.get('mm_vision_tower')!r}, e.g. a download of openai/clip-vit-large-patch14)")
    if raw.get("mm_vision_select_layer", -2) != -2:
        raise InputError(f"mm_vision_select_layer {raw['mm_vision_select_layer']} is not Shikra's -2")
    text_config = LlamaConfig(**{k: raw[k] for k in LLAMA_KEYS if k in raw})
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # as Shikra's loader (model version v1)
    text_config.pad_token_id = tokenizer.pad_token_id
    patch_id = tokenizer.convert_tokens_to_ids("<im_patch>")
    if patch_id is None or patch_id == tokenizer.unk_token_id:
        raise InputError(f"the tokenizer in {checkpoint} has no <im_patch> token: use the merged Shikra checkpoint")
    vision_config = _vision_config(vision_dir)
    side = vision_config.image_size // vision_config.patch_size
    config = shikra_llava_config(vision_config, text_config, patch_id, side * side)
    if image_pad == "white":
        config.shikra_pad_color = list(SHIKRA_PAD_COLOR)

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    nested = any(k.startswith("model.vision_tower.vision_model.") for k in model.state_dict())
    state = map_shikra_state_dict(read_state_dict(checkpoint, "--checkpoint"),
                                  read_state_dict(vision_dir, "--vision-tower"),
                                  "model.vision_tower.vision_model." if nested else "model.vision_tower.")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (text_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"the checkpoints do not match the stock LLaVA layout: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    if (vision_dir / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessorPil.from_pretrained(vision_dir)
    else:
        size = vision_config.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    shikra_processor(image_processor, tokenizer, vision_config.patch_size).save_pretrained(out)
    return out
