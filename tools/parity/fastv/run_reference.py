"""Run pkunlp-icler/FastV's llava-hf port (its transformers 4.39.0.dev0 fork, installed unmodified from the
checkout's src/FastV/llava-hf/transformers) on the exported tiny LLaVA.

Run in the reference venv (see README.md): python run_reference.py WORKDIR OUT_JSON

Driven as demo-hf.py drives it: `LlavaForConditionalGeneration.from_pretrained(..., attn_implementation="eager",
fastv_config={"use_fastv": True, "fastv_k": K, "fastv_r": R, "image_token_start_index": s,
"image_token_length": n})`, then `generate(input_ids, pixel_values, do_sample=False, use_cache=...)`. The fork
reads `config.fastv_config` on every forward, so the image span is set per case on the loaded model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration

WORK, OUT = Path(sys.argv[1]), Path(sys.argv[2])
MAX_NEW = 24

# name: (fastv_k, fastv_r, use_cache); None: plain greedy (fastv_config=None, the fork's stock path)
SETTINGS = {
    "k2_r0.5_cache": (2, 0.5, True),
    "k3_r0.75_cache": (3, 0.75, True),
    "k1_r0.25_cache": (1, 0.25, True),
    "k2_r0.5_nocache": (2, 0.5, False),
    "k3_r0.75_nocache": (3, 0.75, False),
    "baseline_greedy": None,
}


def main() -> None:
    torch.set_num_threads(1)
    meta = json.loads((WORK / "cases.json").read_text())
    pixels = load_file(str(WORK / "pixels.safetensors"))
    image_token = json.loads((WORK / "llava_hf" / "config.json").read_text())["image_token_index"]
    results = {}
    for name, setting in SETTINGS.items():
        first = meta["cases"][0]
        fastv_config = None if setting is None else {
            "use_fastv": True, "fastv_k": setting[0], "fastv_r": setting[1],
            "image_token_start_index": first["img_start"],
            "image_token_length": first["img_end"] - first["img_start"]}
        model = LlavaForConditionalGeneration.from_pretrained(
            WORK / "llava_hf", attn_implementation="eager", fastv_config=fastv_config).eval()
        rows = []
        for case in meta["cases"]:
            ids = case["input_ids"]
            s, e = case["img_start"], case["img_end"]
            if fastv_config is not None:
                model.config.fastv_config["image_token_start_index"] = s
                model.config.fastv_config["image_token_length"] = e - s
            # The 4.39 processor leaves one <image> token per image; the model expands it.
            prompt = torch.tensor([ids[:s] + [image_token] + ids[e:]])
            with torch.inference_mode():
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     pixel_values=pixels[f"case{case['index']}"][None], do_sample=False,
                                     max_new_tokens=MAX_NEW, use_cache=True if setting is None else setting[2],
                                     eos_token_id=meta["eos_token_id"], pad_token_id=meta["pad_token_id"])
            rows.append(out[0, prompt.shape[1]:].tolist())
        results[name] = {"fastv": setting is not None,
                         "fastv_k": None if setting is None else setting[0],
                         "fastv_r": None if setting is None else setting[1],
                         "use_cache": True if setting is None else setting[2], "output_ids": rows}
        print(name, "done", flush=True)
    OUT.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                               "max_new_tokens": MAX_NEW, "settings": results}))


if __name__ == "__main__":
    main()
