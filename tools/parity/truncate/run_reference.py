"""Run zhangbaijin/From-Redundancy-to-Relevance's truncation model file, unmodified, on the exported tiny
24-layer model with LLaVA-1.5's geometry (transformers 4.31).

Run in the reference venv (see README.md): python run_reference.py R2R_CHECKOUT WORKDIR OUT_JSON

`minigpt4/models/modeling_llama_truncation.py` is a drop-in `modeling_llama.py` (4.31 API) whose constants are
hard-coded: SYS_LENGTH=36, IMAGE_TOKEN_LENGTH=576, ATTENTION_RANK=0, AGG_LAYER=22 (no query of layers >= 22
attends to an image key, in every forward). It is imported from the checkout as a module and its
`LlamaForCausalLM` is loaded from the exported checkpoint; `generate` gets the LLaVA class's merged
`inputs_embeds` (image at positions 36..611) next to the LLaVA prompt ids (one IMAGE_TOKEN_INDEX), greedy, with
`output_attentions=True` (layer 22 reads layer 21's attention weights from the layer output; without it that slot
holds the KV cache and the code fails). The baseline is stock 4.31 `LlamaForCausalLM` on the same inputs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

REF, WORK, OUT = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
IMAGE_TOKEN_INDEX = -200
MAX_NEW = 24


def _reference_module():
    path = REF / "minigpt4" / "models" / "modeling_llama_truncation.py"
    spec = importlib.util.spec_from_file_location("r2r_modeling_llama_truncation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    torch.set_num_threads(1)
    meta = json.loads((WORK / "cases.json").read_text())
    embeds = load_file(str(WORK / "embeds.safetensors"))
    for case in meta["cases"]:
        assert (case["img_start"], case["img_end"]) == (36, 612), "the reference hard-codes the image at 36..611"
    models = {"truncate_l22_k0": _reference_module().LlamaForCausalLM.from_pretrained(WORK / "llama").eval(),
              "baseline_greedy": LlamaForCausalLM.from_pretrained(WORK / "llama").eval()}
    results = {}
    for name, model in models.items():
        rows = []
        for case in meta["cases"]:
            ids = case["input_ids"]
            s, e = case["img_start"], case["img_end"]
            llava_ids = torch.tensor([ids[:s] + [IMAGE_TOKEN_INDEX] + ids[e:]])
            with torch.inference_mode():
                out = model.generate(input_ids=llava_ids, inputs_embeds=embeds[f"case{case['index']}"][None],
                                     do_sample=False, max_new_tokens=MAX_NEW, use_cache=True, num_beams=1,
                                     output_attentions=True, eos_token_id=meta["eos_token_id"],
                                     pad_token_id=meta["pad_token_id"])
            rows.append(out[0, llava_ids.shape[1]:].tolist())
        results[name] = {"truncate": name != "baseline_greedy", "layer": 22, "keep": 0, "output_ids": rows}
        print(name, "done", flush=True)
    OUT.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                               "max_new_tokens": MAX_NEW, "settings": results}))


if __name__ == "__main__":
    main()
