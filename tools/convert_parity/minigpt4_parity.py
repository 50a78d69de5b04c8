"""Regenerate tests/data/convert/minigpt4.json: the original MiniGPT-4 modules' outputs on seeded small weights.

Runs in a side environment with MiniGPT-4's pins (torch 2.13 as vlmscope; transformers 4.30.0; timm 0.6.13, or
stand-ins for its three helpers where timm cannot import for want of a matching torchvision) and
MiniGPT-4's model files from a checkout, unmodified: `minigpt4/models/eva_vit.py` (EVA ViT-g's
`VisionTransformer`), `minigpt4/models/Qformer.py` (`BertLMHeadModel`) and transformers 4.30's LLaMA:

    git clone https://github.com/Vision-CAIR/MiniGPT-4 SCRATCH/MiniGPT-4
    python -m venv SCRATCH/venv-minigpt4 && SCRATCH/venv-minigpt4/bin/pip install torch==2.13.0 transformers==4.30.0 \
        timm==0.6.13
    SCRATCH/venv-minigpt4/bin/python tools/convert_parity/minigpt4_parity.py --minigpt4 SCRATCH/MiniGPT-4 \
        --out tests/data/convert

The `minigpt4` package's `__init__` (datasets, runners, torchvision) is not imported: the two model files are
loaded as submodules of an empty package pointing at the checkout. `MiniGPT4.__init__` itself downloads the
released weights, so the modules are built here with the arguments `init_vision_encoder` / `init_Qformer` pass
(small sizes) and composed as `MiniGPT4.encode_img` and OPERA's `prompt_wrap` do: `ln_vision(ViT(image))` →
`Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=...)` → `llama_proj`, spliced between the
embeddings of `<s>` + the text before `<ImageHere>` and the text after it.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import seeded_state_dict, seeded_tensor  # noqa: E402

# Ids of the test's tiny word-level tokenizer (vlmscope.models.tiny.build_tokenizer: <s>=1, <image>=4).
VOCAB, BOS, EOS, PAD, IMAGE_ID = 62, 1, 2, 3, 4
IMAGE, PATCH, QUERIES = 32, 8, 8
BEFORE_IDS = [11, 13, 17, 18]  # the text before <ImageHere> (no BOS: prompt_wrap adds it as an embedding)
AFTER_IDS = [19, 20, 21, 22, 12, 13]
NEW_TOKENS = 8


def _timm_stand_ins() -> None:
    """timm 0.6.13 imports torchvision, which has no build for torch 2.13 here: stand in for the three helpers
    eva_vit.py takes from it (drop_path is the identity at rate 0 in eval; to_2tuple; trunc_normal_ only
    initialises weights, which the seeded ones replace) and for the hub module dist_utils imports."""
    import collections.abc
    import itertools

    def to_2tuple(x):
        return tuple(x) if isinstance(x, collections.abc.Iterable) else tuple(itertools.repeat(x, 2))

    def drop_path(x, drop_prob=0.0, training=False):
        assert drop_prob == 0.0 or not training
        return x

    layers = types.ModuleType("timm.models.layers")
    layers.drop_path, layers.to_2tuple, layers.trunc_normal_ = drop_path, to_2tuple, nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    for name, module in (("timm", types.ModuleType("timm")), ("timm.models", types.ModuleType("timm.models")),
                         ("timm.models.layers", layers), ("timm.models.registry", registry),
                         ("timm.models.hub", types.ModuleType("timm.models.hub"))):
        sys.modules[name] = module


def import_original(checkout: Path):
    try:
        import timm.models.layers  # noqa: F401
    except (ImportError, RuntimeError):
        _timm_stand_ins()
    for name in ("minigpt4", "minigpt4.common", "minigpt4.models"):
        package = types.ModuleType(name)
        package.__path__ = [str(checkout / name.replace(".", "/"))]
        sys.modules[name] = package
    from minigpt4.models.eva_vit import VisionTransformer
    from minigpt4.models.Qformer import BertConfig, BertLMHeadModel

    return VisionTransformer, BertConfig, BertLMHeadModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minigpt4", type=Path, required=True, help="a checkout of Vision-CAIR/MiniGPT-4")
    parser.add_argument("--out", type=Path, required=True, help="folder for minigpt4.json")
    args = parser.parse_args()
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    VisionTransformer, BertConfig, BertLMHeadModel = import_original(args.minigpt4)
    torch.manual_seed(0)
    # create_eva_vit_g's arguments at a small size (its 1408/39/16 are the released ones).
    visual_encoder = VisionTransformer(img_size=IMAGE, patch_size=PATCH, use_mean_pooling=False, embed_dim=32,
                                       depth=2, num_heads=4, mlp_ratio=2.0, qkv_bias=True, drop_path_rate=0.0,
                                       norm_layer=partial(nn.LayerNorm, eps=1e-6))
    ln_vision = nn.LayerNorm(32)  # LAVIS's LayerNorm: nn.LayerNorm computed in float32 (eps 1e-5)
    # init_Qformer, with a small BertConfig in place of bert-base-uncased's.
    encoder_config = BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)
    encoder_config.encoder_width = 32
    encoder_config.add_cross_attention = True
    encoder_config.cross_attention_freq = 2
    encoder_config.query_length = QUERIES
    qformer = BertLMHeadModel(config=encoder_config)
    qformer.cls = None
    qformer.bert.embeddings.word_embeddings = None
    qformer.bert.embeddings.position_embeddings = None
    for layer in qformer.bert.encoder.layer:
        layer.output = None
        layer.intermediate = None
    query_tokens = nn.Parameter(torch.zeros(1, QUERIES, 32))
    llama_proj = nn.Linear(32, 64)
    llama_config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    llama = LlamaForCausalLM(llama_config).eval()

    parts = {"visual_encoder": visual_encoder, "ln_vision": ln_vision, "Qformer": qformer, "llama_proj": llama_proj}
    shapes = {f"{prefix}.{k}": list(v.shape) for prefix, module in parts.items()
              for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    shapes["query_tokens"] = list(query_tokens.shape)
    weights = seeded_state_dict(shapes)
    for prefix, module in parts.items():
        own = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
        missing, unexpected = module.load_state_dict(own, strict=False)
        assert not unexpected and all(k.endswith("position_ids") for k in missing), (prefix, missing, unexpected)
    with torch.no_grad():
        query_tokens.copy_(weights["query_tokens"])
    llama_shapes = {k: list(v.shape) for k, v in llama.state_dict().items() if not k.endswith("inv_freq")}
    missing, unexpected = llama.load_state_dict(seeded_state_dict(llama_shapes), strict=False)
    assert not unexpected and all(k.endswith("inv_freq") for k in missing), (missing, unexpected)
    for module in parts.values():
        module.eval()

    image = seeded_tensor("pixel_values", [1, 3, IMAGE, IMAGE])
    with torch.no_grad():
        image_embeds = ln_vision(visual_encoder(image))  # MiniGPT4.encode_img, fp32 (vit_precision="fp32")
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
        query_output = qformer.bert(query_embeds=query_tokens.expand(1, -1, -1), encoder_hidden_states=image_embeds,
                                    encoder_attention_mask=image_atts, return_dict=True)
        inputs_llama = llama_proj(query_output.last_hidden_state)
        embed = llama.get_input_embeddings()
        prefix_embeds = embed(torch.tensor([[BOS, *BEFORE_IDS]]))
        embeds = torch.cat([prefix_embeds, inputs_llama, embed(torch.tensor([AFTER_IDS]))], dim=1)
        logits = llama(inputs_embeds=embeds).logits[0]
        tokens = []
        current = embeds
        for _ in range(NEW_TOKENS):  # greedy, full recompute each step
            token = int(llama(inputs_embeds=current).logits[0, -1].argmax())
            tokens.append(token)
            current = torch.cat([current, embed(torch.tensor([[token]]))], dim=1)
    fixture = {
        "original": "Vision-CAIR/MiniGPT-4 minigpt4/models/eva_vit.py VisionTransformer + Qformer.py BertLMHeadModel "
                    "(unmodified), transformers LlamaForCausalLM, composed as MiniGPT4.encode_img / prompt_wrap",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "shapes": shapes,
        "llama_config": json.loads(llama_config.to_json_string()),
        "llama_shapes": llama_shapes,
        "vision": {"image_size": IMAGE, "heads": 4}, "qformer": {"heads": 4, "cross_attention_frequency": 2},
        "image_token_id": IMAGE_ID,
        "input_ids": [BOS, *BEFORE_IDS, *[IMAGE_ID] * QUERIES, *AFTER_IDS],
        "query_features": [[round(float(x), 6) for x in row] for row in inputs_llama[0]],
        "logits": [[round(float(x), 6) for x in row] for row in logits],
        "greedy_tokens": tokens,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minigpt4.json").write_text(json.dumps(fixture) + "\n")
    print(f"wrote {args.out / 'minigpt4.json'}: greedy {tokens}")


if __name__ == "__main__":
    main()
