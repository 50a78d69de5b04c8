"""Run DAMO-NLP-SG/VCD's own code, unmodified, on the exported tiny LLaVA (transformers 4.31).

Run in the reference venv (see README.md): python run_reference.py VCD_CHECKOUT WORKDIR OUT_JSON

Driven as experiments/eval/object_hallucination_vqa_llava.py drives it: `evolve_vcd_sampling()` (replaces
`GenerationMixin.sample`), the vendored LLaVA class (`experiments/llava`) loaded from the exported checkpoint,
per case `add_diffusion_noise(image_tensor, noise_step)` and `model.generate(input_ids, images=..., images_cd=...,
cd_alpha=..., cd_beta=..., do_sample=True, temperature=1, top_p=1, top_k=None, use_cache=True)`.
The script seeds once (`set_seed(42)`) and draws noise and samples from the global RNG across all images; here the
global RNG is seeded per case, once before the noise (`noise_seed`) and once before `generate` (`sample_seed`),
so each case stands alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

REF, WORK, OUT = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.path.insert(0, str(REF))
sys.path.insert(0, str(REF / "experiments"))
from llava.model import LlavaLlamaForCausalLM  # noqa: E402  (the reference's vendored LLaVA)
from vcd_utils.vcd_add_noise import add_diffusion_noise  # noqa: E402
from vcd_utils.vcd_sample import evolve_vcd_sampling  # noqa: E402

evolve_vcd_sampling()

IMAGE_TOKEN_INDEX = -200  # experiments/llava/constants.py
MAX_NEW = 24

# name: (use_cd, cd_alpha, cd_beta, noise_step, top_k)
SETTINGS = {
    "vcd_a1_b0.1_n500": (True, 1.0, 0.1, 500, None),
    "vcd_a0.5_b0.1_n999": (True, 0.5, 0.1, 999, None),
    "vcd_a1_b0.2_n200": (True, 1.0, 0.2, 200, None),
    "baseline_sample": (False, 1.0, 0.1, 500, None),
}


def noise_seed(index: int) -> int:
    return 100 + index


def sample_seed(index: int) -> int:
    return 200 + index


def main() -> None:
    torch.set_num_threads(1)
    model = LlavaLlamaForCausalLM.from_pretrained(WORK / "llava").eval()
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()  # as llava/model/builder.py does
    meta = json.loads((WORK / "cases.json").read_text())
    pixels = load_file(str(WORK / "pixels.safetensors"))
    embeds = load_file(str(WORK / "embeds.safetensors"))
    # The vendored LLaVA's own image merge against the 5.x model's (float-level agreement).
    case = meta["cases"][0]
    ids = case["input_ids"]
    s, e = case["img_start"], case["img_end"]
    llava_ids = torch.tensor([ids[:s] + [IMAGE_TOKEN_INDEX] + ids[e:]])
    with torch.no_grad():
        _, _, _, merged, _ = model.prepare_inputs_labels_for_multimodal(
            llava_ids, None, None, None, pixels["case0"][None])
    embed_diff = float((merged[0] - embeds["case0"]).abs().max())
    print("max |embeds(4.31 LLaVA) - embeds(5.x)| =", embed_diff)
    assert embed_diff < 1e-4, "the exported LLaVA does not reproduce the 5.x model's image merge"
    results = {}
    for name, (use_cd, alpha, beta, step, top_k) in SETTINGS.items():
        rows = []
        for case in meta["cases"]:
            ids = case["input_ids"]
            s, e = case["img_start"], case["img_end"]
            llava_ids = torch.tensor([ids[:s] + [IMAGE_TOKEN_INDEX] + ids[e:]])
            image_tensor = pixels[f"case{case['index']}"]
            torch.manual_seed(noise_seed(case["index"]))
            image_tensor_cd = add_diffusion_noise(image_tensor, step) if use_cd else None
            torch.manual_seed(sample_seed(case["index"]))
            with torch.inference_mode():
                out = model.generate(
                    llava_ids, images=image_tensor.unsqueeze(0),
                    images_cd=(image_tensor_cd.unsqueeze(0) if image_tensor_cd is not None else None),
                    cd_alpha=alpha, cd_beta=beta, do_sample=True, temperature=1.0, top_p=1.0, top_k=top_k,
                    max_new_tokens=MAX_NEW, use_cache=True,
                    eos_token_id=meta["eos_token_id"], pad_token_id=meta["pad_token_id"])
            rows.append(out[0, llava_ids.shape[1]:].tolist())
        results[name] = {"use_cd": use_cd, "cd_alpha": alpha, "cd_beta": beta, "noise_step": step,
                         "top_k": top_k, "noise_seeds": [noise_seed(c["index"]) for c in meta["cases"]],
                         "sample_seeds": [sample_seed(c["index"]) for c in meta["cases"]], "output_ids": rows}
        print(name, "done", flush=True)
    OUT.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                               "max_new_tokens": MAX_NEW, "embeds_max_abs_diff": embed_diff,
                               "settings": results}))


if __name__ == "__main__":
    main()
