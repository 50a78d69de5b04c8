"""Run LALBJ/PAI's own attention.py and CFG.py, unmodified, on the exported tiny model (transformers 4.37).

Run in the reference venv (see README.md): python run_reference.py PAI_CHECKOUT WORKDIR OUT_JSON

Driven as chair_eval.py drives it, per case: `llama_modify(model, start, end, use_attn, alpha, use_cfg,
img_start_idx, img_end_idx)`, then (with --use-cfg) the `CFGLogits` processor that `init_cfg_processor` builds
(unconditional prompt = BOS + tokens before the image + tokens after it, repeated `beam` times), then
`generate(do_sample=False, use_cache=True, num_beams=beam, ...)`. The LLaVA class of the reference merges the
image into `inputs_embeds` and calls `LlamaForCausalLM`; here the same merge comes precomputed from the exporter
and `generate` gets the LLaVA prompt ids (one IMAGE_TOKEN_INDEX placeholder) next to it, as LLaVA's `generate`
sees them, so prompt lengths (beam length normalisation) are those of the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LogitsProcessorList

REF, WORK, OUT = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.path.insert(0, str(REF))
from attention import llama_modify  # noqa: E402  (the reference's file)
from CFG import CFGLogits  # noqa: E402  (the reference's file)

IMAGE_TOKEN_INDEX = -200  # LALBJ/PAI constants.py
MAX_NEW = 24

# name: (use_attn, alpha, start, end, use_cfg, gamma, beam); beam 0 = `--sample` (do_sample=True, num_beams=1)
SETTINGS = {
    "attn_a0.2_l2-4_greedy": (True, 0.2, 2, 4, False, 1.1, 1),
    "attn_a0.5_l1-4_greedy": (True, 0.5, 1, 4, False, 1.1, 1),
    "attn_a0.5_l1-4_beam3": (True, 0.5, 1, 4, False, 1.1, 3),
    "cfg_g1.1_a0.2_l2-4_greedy": (True, 0.2, 2, 4, True, 1.1, 1),
    "cfg_g2_a0.5_l1-4_greedy": (True, 0.5, 1, 4, True, 2.0, 1),
    "cfg_g2_a0.5_l1-4_beam3": (True, 0.5, 1, 4, True, 2.0, 3),
    "cfg_g1_a0.5_l1-4_greedy": (True, 0.5, 1, 4, True, 1.0, 1),
    "attn_a0.5_l1-4_sample": (True, 0.5, 1, 4, False, 1.1, 0),
    "cfg_g1.1_a0.2_l2-4_sample": (True, 0.2, 2, 4, True, 1.1, 0),
    "baseline_greedy": (False, 0.0, 0, 4, False, 1.1, 1),
    "baseline_beam3": (False, 0.0, 0, 4, False, 1.1, 3),
    "baseline_sample": (False, 0.0, 0, 4, False, 1.1, 0),
}


def sample_seed(index: int) -> int:
    return 300 + index


def main() -> None:
    torch.set_num_threads(1)
    # The reference pins torch 2.0.1, where transformers 4.37 picks eager attention (SDPA needs torch >= 2.1.1);
    # the patched forward also assumes the 4-D additive mask that only the eager path builds.
    meta = json.loads((WORK / "cases.json").read_text())
    embeds = load_file(str(WORK / "embeds.safetensors"))
    results = {}
    for name, (use_attn, alpha, start, end, use_cfg, gamma, sample_or_beam) in SETTINGS.items():
        sample, beam = sample_or_beam == 0, max(1, sample_or_beam)
        # A fresh model per setting, as each chair_eval.py run is a fresh process: `llama_modify` only sets the
        # layers of its own range, so a patch from a previous setting on other layers would stay active.
        model = LlamaForCausalLM.from_pretrained(WORK / "llama", attn_implementation="eager").eval()
        rows = []
        for case in meta["cases"]:
            ids = case["input_ids"]
            s, e = case["img_start"], case["img_end"]
            llava_ids = torch.tensor([ids[:s] + [IMAGE_TOKEN_INDEX] + ids[e:]])
            llama_modify(model, start, end, use_attn, alpha, use_cfg, s, e)
            kwargs = {}
            if use_cfg:
                neg = torch.tensor([case["uncond_ids"]]).repeat(beam, 1)
                kwargs["logits_processor"] = LogitsProcessorList(
                    [CFGLogits(gamma, neg, model, start_layer=start, end_layer=end)])
            # The script seeds once; here the global RNG is seeded per case before generate (the only draws
            # are the sampler's multinomials), so each case stands alone.
            torch.manual_seed(sample_seed(case["index"]))
            with torch.inference_mode():
                out = model.generate(input_ids=llava_ids, inputs_embeds=embeds[f"case{case['index']}"][None],
                                     do_sample=sample, max_new_tokens=MAX_NEW, use_cache=True, num_beams=beam,
                                     eos_token_id=meta["eos_token_id"], pad_token_id=meta["pad_token_id"],
                                     output_attentions=False, output_hidden_states=False, **kwargs)
            rows.append(out[0, llava_ids.shape[1]:].tolist())
        results[name] = {"use_attn": use_attn, "alpha": alpha, "start_layer": start, "end_layer": end,
                         "use_cfg": use_cfg, "gamma": gamma, "beam": beam, "sample": sample,
                         "sample_seeds": [sample_seed(c["index"]) for c in meta["cases"]] if sample else None,
                         "output_ids": rows}
        print(name, "done", flush=True)
    OUT.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                               "max_new_tokens": MAX_NEW, "settings": results}, indent=None))


if __name__ == "__main__":
    main()
