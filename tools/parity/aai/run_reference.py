"""Run Maccusl/AAI's own attention.py and extract.py, unmodified, on the exported tiny model (transformers 4.37).

Run in the reference venv (see README.md): python run_reference.py AAI_CHECKOUT WORKDIR OUT_JSON

Driven as chair_eval.py drives it, per case: `vis_ref = extract_vision("llava-1.5", model, image, questions)`
(the vision tower's own CLIPVisionModel with `output_attentions=True`), `llama_modify(model, start, end, use_aai,
alpha, beta, img_start_idx, img_end_idx, vis_ref)`, then `generate(do_sample=False, use_cache=True,
num_beams=beam, ...)`. As for PAI, the language model gets the LLaVA class's merged `inputs_embeds` (precomputed
by the exporter) next to the LLaVA prompt ids with one IMAGE_TOKEN_INDEX placeholder. `extract.py` moves the image
to CUDA (`image.cuda()`); on this CPU run `Tensor.cuda` is the identity.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import CLIPVisionModel, LlamaForCausalLM

REF, WORK, OUT = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.path.insert(0, str(REF))
from attention import llama_modify  # noqa: E402  (the reference's file)
from extract import extract_vision  # noqa: E402  (the reference's file)

torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU run: extract.py calls image.cuda()

IMAGE_TOKEN_INDEX = -200
MAX_NEW = 24

# name: (use_aai, alpha, beta, start, end, beam)
SETTINGS = {
    "aai_a0.3_b1_l2-4_greedy": (True, 0.3, 1.0, 2, 4, 1),
    "aai_a1_b1_l1-4_greedy": (True, 1.0, 1.0, 1, 4, 1),
    "aai_a1_b0.8_l1-4_greedy": (True, 1.0, 0.8, 1, 4, 1),
    "aai_a1_b1_l1-4_beam3": (True, 1.0, 1.0, 1, 4, 3),
    "baseline_greedy": (False, 0.0, 1.0, 0, 4, 1),
    "baseline_beam3": (False, 0.0, 1.0, 0, 4, 3),
}


class _Tower:
    """What `extract_llava_attentions` reaches through `model.get_vision_tower().vision_tower`."""

    def __init__(self, clip: torch.nn.Module) -> None:
        self.vision_tower = clip


class _LlavaView:
    def __init__(self, clip: torch.nn.Module) -> None:
        self._tower = _Tower(clip)

    def get_vision_tower(self) -> _Tower:
        return self._tower


def main() -> None:
    torch.set_num_threads(1)
    meta = json.loads((WORK / "cases.json").read_text())
    embeds = load_file(str(WORK / "embeds.safetensors"))
    pixels = load_file(str(WORK / "pixels.safetensors"))
    clip = CLIPVisionModel.from_pretrained(WORK / "clip").eval()
    vlm_view = _LlavaView(clip)
    results, vis_refs = {}, {}
    for name, (use_aai, alpha, beta, start, end, beam) in SETTINGS.items():
        # A fresh model per setting, as each chair_eval.py run is a fresh process.
        model = LlamaForCausalLM.from_pretrained(WORK / "llama", attn_implementation="eager").eval()
        rows = []
        for case in meta["cases"]:
            ids = case["input_ids"]
            s, e = case["img_start"], case["img_end"]
            llava_ids = torch.tensor([ids[:s] + [IMAGE_TOKEN_INDEX] + ids[e:]])
            image = {"pixel_values": [pixels[f"case{case['index']}"][None]]}
            vis_ref = extract_vision("llava-1.5", vlm_view, image, [case["prompt"]])
            vis_refs[case["index"]] = vis_ref.tolist()
            llama_modify(model=model, start_layer=start, end_layer=end, use_aai=use_aai, alpha=alpha, beta=beta,
                         img_start_idx=s, img_end_idx=e, vis_ref=vis_ref)
            with torch.inference_mode():
                out = model.generate(input_ids=llava_ids, inputs_embeds=embeds[f"case{case['index']}"][None],
                                     do_sample=False, max_new_tokens=MAX_NEW, use_cache=True, num_beams=beam,
                                     eos_token_id=meta["eos_token_id"], pad_token_id=meta["pad_token_id"],
                                     output_attentions=False, output_hidden_states=False)
            rows.append(out[0, llava_ids.shape[1]:].tolist())
        results[name] = {"use_aai": use_aai, "alpha": alpha, "beta": beta, "start_layer": start, "end_layer": end,
                         "beam": beam, "output_ids": rows}
        print(name, "done", flush=True)
    OUT.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                               "max_new_tokens": MAX_NEW, "vis_ref": [vis_refs[c["index"]] for c in meta["cases"]],
                               "settings": results}))


if __name__ == "__main__":
    main()
