"""Regenerate tests/data/convert/shikra.json: the original Shikra code's outputs on seeded small weights.

Runs in a side environment with the original's transformers (torch 2.13 as vlmscope, transformers 4.28.1,
Shikra pins a 4.28 development commit) and Shikra's model file from a checkout, unmodified:

    git clone https://github.com/shikras/shikra SCRATCH/shikra
    python -m venv SCRATCH/venv-shikra && SCRATCH/venv-shikra/bin/pip install torch==2.13.0 transformers==4.28.1 \
        sentencepiece
    SCRATCH/venv-shikra/bin/python tools/convert_parity/shikra_parity.py --shikra SCRATCH/shikra --out tests/data/convert

The weights are `seeded.seeded_state_dict` of the original's state-dict layout (names and shapes stored in
the fixture), so tests/test_convert.py rebuilds exactly these tensors, converts them with
`vlmscope convert shikra` and compares logits and greedy tokens with the ones stored here. The CLIP tower is
1024 wide because Shikra's forward projects a hard-coded zeros(256, 1024) dummy feature block.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import seeded_state_dict, seeded_tensor  # noqa: E402

# Token ids of the test's tiny word-level tokenizer (vlmscope.models.tiny.build_tokenizer + the three
# Shikra tokens): <s>=1, </s>=2, <pad>=3, <im_patch>=62, <im_start>=63, <im_end>=64.
VOCAB, BOS, EOS, PAD, IM_PATCH, IM_START, IM_END = 65, 1, 2, 3, 62, 63, 64
IMAGE, PATCH = 32, 8
PROMPT_IDS = [BOS, 11, 13, IM_START, *[IM_PATCH] * ((IMAGE // PATCH) ** 2), IM_END, 17, 18, 19, 20, 12, 13]
NEW_TOKENS = 8


def load_shikra_module(checkout: Path):
    path = checkout / "mllm" / "models" / "shikra" / "shikra.py"
    spec = importlib.util.spec_from_file_location("shikra_original", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shikra", type=Path, required=True, help="a checkout of shikras/shikra")
    parser.add_argument("--out", type=Path, required=True, help="folder for shikra.json")
    args = parser.parse_args()
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    shikra = load_shikra_module(args.shikra)
    scratch = Path(tempfile.mkdtemp())
    vision_config = CLIPVisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=16, image_size=IMAGE, patch_size=PATCH)
    clip = CLIPVisionModel(vision_config)
    clip_shapes = {k: list(v.shape) for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    clip.load_state_dict(seeded_state_dict(clip_shapes), strict=False)
    clip.save_pretrained(scratch / "clip")

    config = shikra.ShikraConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                                 bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    config.mm_vision_tower = str(scratch / "clip")
    config.use_mm_proj = True
    config.mm_hidden_size = 1024
    config.mm_vision_select_layer = -2
    config.mm_use_im_start_end = True
    model = shikra.ShikraLlamaForCausalLM(config).eval()
    # What initialize_vision_tokenizer records for a tokenizer that already holds the three tokens.
    tower_config = model.model.vision_tower[0].config
    tower_config.use_im_start_end = True
    tower_config.im_patch_token, tower_config.im_start_token, tower_config.im_end_token = IM_PATCH, IM_START, IM_END
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(seeded_state_dict(shapes), strict=False)
    assert not unexpected and all(k.endswith("inv_freq") for k in missing), (missing, unexpected)

    pixel_values = seeded_tensor("pixel_values", [1, 3, IMAGE, IMAGE])
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixel_values).logits[0]
        tokens = []
        current = ids
        for _ in range(NEW_TOKENS):  # greedy, full recompute each step (no cache: the plainest reference)
            step = model(input_ids=current, images=pixel_values).logits[0, -1]
            token = int(step.argmax())
            tokens.append(token)
            current = torch.cat([current, torch.tensor([[token]])], dim=1)
    raw_config = json.loads(model.config.to_json_string())
    raw_config.pop("mm_vision_tower")
    fixture = {
        "original": "shikras/shikra mllm/models/shikra/shikra.py (ShikraLlamaForCausalLM), unmodified",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "shikra_config": raw_config,
        "shikra_shapes": shapes,
        "clip_config": json.loads(vision_config.to_json_string()),
        "clip_shapes": clip_shapes,
        "prompt_ids": PROMPT_IDS,
        "pixel_values": "seeded_tensor('pixel_values', [1, 3, 32, 32])",
        "logits": [[round(float(x), 6) for x in row] for row in logits],
        "greedy_tokens": tokens,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shikra.json").write_text(json.dumps(fixture) + "\n")
    print(f"wrote {args.out / 'shikra.json'}: greedy {tokens}")


if __name__ == "__main__":
    main()
