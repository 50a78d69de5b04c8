"""MiniGPT-4 (Vision-CAIR/MiniGPT-4, Vicuna v0) → a stock `Blip2ForConditionalGeneration` with a LLaMA.

MiniGPT-4 is BLIP-2's EVA ViT-g (`visual_encoder`, `ln_vision`), BLIP-2's Q-Former without its text parts
(`Qformer.bert`, `query_tokens`), one linear map (`llama_proj`) and Vicuna. Its own checkpoint
(`pretrained_minigpt4*.pth`) holds only `llama_proj`; the ViT and the Q-Former come from BLIP-2's
`blip2_pretrained_flant5xxl.pth` (and `eva_vit_g.pth` for a ViT it does not hold), the language model from a
Vicuna folder. Every tensor maps one to one onto the stock BLIP-2 names; EVA's separate q/v biases become the
one qkv bias `cat(q_bias, 0, v_bias)`.

The chat template is OPERA's MiniGPT-4 prompt, `###Human: <Img><ImageHere></Img> <question> ###Assistant:`,
with the `<ImageHere>` slot written as one `<image>` per query: the stock model scatters the 32 projected
queries into those positions. `<image>` is a token added to Vicuna's vocabulary (its new rows in the embedding
and the output layer are zero: the embedding is always replaced; its logit is 0, not -inf).

Known differences from the original:
- `ln_vision` uses eps 1e-5, stock BLIP-2's `post_layernorm` the vision config's `layer_norm_eps` (1e-6, shared
  with the ViT's own norms); the config records `ln_vision_eps` and `vlmscope.load` sets the module's eps to it.
- the original runs the ViT in fp16 (`vit_precision`); converted weights keep the stored precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmscope.errors import InputError
from vlmscope.models.convert._io import read_state_dict

LN_VISION_EPS = 1e-5


def read_torch_checkpoint(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A LAVIS / MiniGPT-4 `.pth` (`{"model": state}` or a bare state dict), or a folder of weights."""
    if path.is_dir():
        return read_state_dict(path, what)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist: point to the .pth file")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    return dict(loaded.get("model", loaded)) if isinstance(loaded, dict) else loaded


def map_minigpt4_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MiniGPT-4's vision, Q-Former and projection tensors under the stock BLIP-2 names."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in original.items():
        if key.startswith("visual_encoder."):
            name = key[len("visual_encoder."):]
            if name == "cls_token":
                out["vision_model.embeddings.class_embedding"] = value
            elif name == "pos_embed":
                out["vision_model.embeddings.position_embedding"] = value
            elif name.startswith("patch_embed.proj."):
                out["vision_model.embeddings.patch_embedding." + name.rsplit(".", 1)[1]] = value
            elif name.startswith("blocks."):
                _, index, rest = name.split(".", 2)
                prefix = f"vision_model.encoder.layers.{index}."
                renames = {"norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.qkv.": "self_attn.qkv.",
                           "attn.proj.": "self_attn.projection.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
                if rest in ("attn.q_bias", "attn.v_bias"):
                    continue  # joined into the qkv bias below
                for old, new in renames.items():
                    if rest.startswith(old):
                        out[prefix + new + rest[len(old):]] = value
                        break
                else:
                    unknown.append(key)
            else:
                unknown.append(key)
        elif key.startswith("ln_vision."):
            out["vision_model.post_layernorm." + key.rsplit(".", 1)[1]] = value
        elif key == "query_tokens":
            out[key] = value
        elif key.startswith("Qformer.bert.embeddings.LayerNorm."):
            out["qformer.layernorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("Qformer.bert.encoder.layer."):
            name = key[len("Qformer.bert.encoder.layer."):]
            index, rest = name.split(".", 1)
            for part in ("attention", "crossattention"):
                if rest.startswith(f"{part}.self."):
                    rest = f"{part}.attention." + rest[len(f"{part}.self."):]
            if rest.startswith(("intermediate.", "output.")):
                continue  # the text FFN: MiniGPT-4 deletes it, a queries-only Q-Former never runs it
            out[f"qformer.encoder.layer.{index}.{rest}"] = value
        elif key.startswith("llama_proj."):
            out["language_projection." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("Qformer.cls.", "Qformer.bert.embeddings.word_embeddings",
                             "Qformer.bert.embeddings.position_embeddings", "Qformer.bert.embeddings.position_ids",
                             "t5_", "llm_", "opt_", "vision_proj", "text_proj", "itm_head", "temp")):
            continue  # BLIP-2 pre-training heads and its own language model's parts: not MiniGPT-4's
        else:
            unknown.append(key)
    if unknown:
        raise InputError(f"unexpected tensors in the MiniGPT-4 / BLIP-2 checkpoints: {', '.join(sorted(unknown)[:5])}")
    for key in list(original):
        if key.startswith("visual_encoder.blocks.") and key.endswith("attn.q_bias"):
            index = key.split(".")[2]
            q_bias = original[key]
            v_bias = original[key.replace("q_bias", "v_bias")]
            out[f"vision_model.encoder.layers.{index}.self_attn.qkv.bias"] = torch.cat(
                [q_bias, torch.zeros_like(v_bias), v_bias])
    for needed in ("language_projection.weight", "query_tokens", "vision_model.embeddings.class_embedding",
                   "vision_model.post_layernorm.weight"):
        if needed not in out:
            raise InputError(f"the checkpoints have no tensor for {needed}: give --checkpoint (llama_proj), "
                             "--blip2 (Q-Former, ln_vision) and --eva-vit when the BLIP-2 file has no ViT")
    return out


def minigpt4_configs(original: dict[str, torch.Tensor], text_config: Any, image_size: int,
                     num_query_tokens: int, qformer_heads: int, vision_heads: int,
                     cross_attention_frequency: int) -> tuple[Any, Any]:
    """Vision and Q-Former configs read off the tensor shapes (plus what shapes cannot tell)."""
    from transformers import Blip2QFormerConfig, Blip2VisionConfig

    patch = original["visual_encoder.patch_embed.proj.weight"]
    hidden, patch_size = patch.shape[0], patch.shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in original if k.startswith("visual_encoder.blocks."))
    mlp = original["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
    vision = Blip2VisionConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=depth,
                               num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size,
                               layer_norm_eps=1e-6, qkv_bias=True)
    q_layers = 1 + max(int(k.split(".")[4]) for k in original if k.startswith("Qformer.bert.encoder.layer."))
    q_hidden = original["query_tokens"].shape[-1]
    q_mlp = original["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0]
    qformer = Blip2QFormerConfig(hidden_size=q_hidden, num_hidden_layers=q_layers, num_attention_heads=qformer_heads,
                                 intermediate_size=q_mlp, cross_attention_frequency=cross_attention_frequency,
                                 encoder_hidden_size=hidden)
    if original["query_tokens"].shape[1] != num_query_tokens:
        raise InputError(f"the Q-Former has {original['query_tokens'].shape[1]} queries, not {num_query_tokens}")
    return vision, qformer


def convert_minigpt4(checkpoint: str | Path, llm: str | Path, out: str | Path, blip2: str | Path | None = None,
                     eva_vit: str | Path | None = None, image_size: int = 224, vision_heads: int = 16,
                     qformer_heads: int = 12, cross_attention_frequency: int = 2,
                     dtype: torch.dtype | None = None) -> Path:
    """Write a stock BLIP-2 checkpoint (model, tokenizer with `<image>`, processor, template) to `out`."""
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
    )

    from vlmscope.models.tiny_seed import minigpt4_template

    original: dict[str, torch.Tensor] = {}
    for path, what in ((eva_vit, "--eva-vit"), (blip2, "--blip2"), (checkpoint, "--checkpoint")):
        if path is not None:
            state = read_torch_checkpoint(Path(path), what)
            if what == "--eva-vit":  # a bare ViT state dict: put it under MiniGPT-4's name
                state = {k if k.startswith("visual_encoder.") else "visual_encoder." + k: v for k, v in state.items()}
            original.update(state)  # later files win, as MiniGPT-4 loads them (strict=False) in this order
    llm = Path(llm)
    if not (llm / "config.json").is_file():
        raise InputError(f"--llm {llm} has no config.json: point to the Vicuna (LLaMA) folder")
    text_config = AutoConfig.from_pretrained(llm)
    if text_config.model_type != "llama":
        raise InputError(f"--llm {llm} is a {text_config.model_type!r} model: MiniGPT-4 uses Vicuna (LLaMA)")
    num_queries = int(original["query_tokens"].shape[1]) if "query_tokens" in original else 32
    if "visual_encoder.patch_embed.proj.weight" not in original:
        raise InputError("no ViT tensors: give --eva-vit (eva_vit_g.pth) or a --blip2 file that holds them")
    vision, qformer = minigpt4_configs(original, text_config, image_size, num_queries, qformer_heads,
                                       vision_heads, cross_attention_frequency)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    llm_state = {("language_model." + k): v for k, v in read_state_dict(llm, "--llm").items()
                 if not k.endswith("rotary_emb.inv_freq")}
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in llm_state and llm_state[key].shape[0] < len(tokenizer):
            old = llm_state[key]
            grown = torch.zeros(len(tokenizer), old.shape[1], dtype=old.dtype)
            grown[: old.shape[0]] = old
            llm_state[key] = grown
    text_config.vocab_size = len(tokenizer)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text_config.to_dict(), num_query_tokens=num_queries,
                         image_token_index=image_id)
    config.ln_vision_eps = LN_VISION_EPS
    state = {**map_minigpt4_state_dict(original), **llm_state}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (text_config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise InputError(f"the checkpoints do not match the stock BLIP-2 layout: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    # LAVIS blip2_image_eval: a square resize (bicubic), CLIP mean and std, as BlipImageProcessorPil does.
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, num_query_tokens=None,
    )
    processor.chat_template = tokenizer.chat_template = minigpt4_template(num_queries)
    processor.save_pretrained(out)
    return out
