"""Run shikiw/OPERA's `opera_beam_search` (its vendored transformers 4.29.2, unmodified) and its plain beam
search on a tiny random Llama with a fake image span, and write the JSON fixtures vlmscope's parity tests read.

Runs ONLY inside the side venv made by `make_venv.sh` (torch 2.13 CPU + the reference's transformers-4.29.2);
it imports nothing from vlmscope. See README.md next to this file for how the reference has to be driven.

    python tools/parity/opera/run_reference.py --reference /path/to/OPERA --out tests/data/parity/opera
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# The tiny model: small enough to store, sharp enough (weights x WEIGHT_GAIN) for peaked attention, so the
# over-trust scores leave float16's zero range and rollbacks actually fire.
MODEL_CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu",
                    tie_word_embeddings=False)
MODEL_SEED = 0
WEIGHT_GAIN = 6.0

PROMPT_LENGTH = (12, 20)  # prompt lengths drawn in [low, high]
IMAGE_LENGTH = (4, 8)  # fake image span lengths drawn in [low, high]

# (name, kind, number of prompts, parameters). kind "opera": generate(opera_decoding=True, ...);
# "beam": plain generate(num_beams=K), both with the prompt as inputs_embeds; "beam_input_ids": plain
# generate(num_beams=K) with the prompt as input_ids. window_size is not a `generate` argument in the reference: it is bound
# onto `opera_beam_search` (see `_bind_window`).
SETTINGS = [
    ("opera_paper_defaults", "opera", 20,
     dict(num_beams=3, scale_factor=50.0, threshold=15, num_attn_candidates=5, penalty_weights=1.0,
          max_new_tokens=20)),
    ("opera_rollbacks", "opera", 20,
     dict(num_beams=3, scale_factor=30.0, threshold=3, num_attn_candidates=3, penalty_weights=1.0,
          max_new_tokens=28)),
    ("opera_rollbacks_two_beams", "opera", 10,
     dict(num_beams=2, scale_factor=30.0, threshold=4, num_attn_candidates=2, penalty_weights=1.0,
          max_new_tokens=28)),
    ("opera_rollbacks_threshold_2", "opera", 10,
     dict(num_beams=3, scale_factor=25.0, threshold=2, num_attn_candidates=3, penalty_weights=1.0,
          max_new_tokens=24)),
    ("opera_five_beams", "opera", 6,
     dict(num_beams=5, scale_factor=200.0, threshold=5, num_attn_candidates=5, penalty_weights=2.0,
          max_new_tokens=20)),
    ("opera_efficient", "opera", 6,
     dict(num_beams=3, scale_factor=30.0, threshold=3, num_attn_candidates=1, penalty_weights=1.0,
          max_new_tokens=28)),
    ("opera_no_penalty", "opera", 6,
     dict(num_beams=3, scale_factor=500.0, threshold=3, num_attn_candidates=3, penalty_weights=0.0,
          max_new_tokens=20)),
    # A short history: rollback positions reach the end of the reference's window_size-long counters and
    # rejection lists (the IndexErrors its bare `except` turns into "no rollback" / "re-choice from the saved
    # candidates").
    ("opera_window_14", "opera", 10,
     dict(num_beams=3, scale_factor=30.0, threshold=3, num_attn_candidates=3, penalty_weights=1.0,
          max_new_tokens=28, window_size=14)),
    ("beam_3", "beam", 20, dict(num_beams=3, max_new_tokens=20)),
    ("beam_5", "beam", 6, dict(num_beams=5, max_new_tokens=16)),
    # The prompt as input_ids instead of inputs_embeds: 4.29 then counts the whole prompt in a hypothesis' length.
    ("beam_3_input_ids", "beam_input_ids", 10, dict(num_beams=3, max_new_tokens=20)),
]


def build_model(transformers):
    config = transformers.LlamaConfig(**MODEL_CONFIG)
    torch.manual_seed(MODEL_SEED)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(WEIGHT_GAIN)
    return model


def make_prompt(seed: int) -> dict:
    generator = torch.Generator().manual_seed(1000 + seed)
    length = int(torch.randint(PROMPT_LENGTH[0], PROMPT_LENGTH[1] + 1, (1,), generator=generator))
    image = int(torch.randint(IMAGE_LENGTH[0], IMAGE_LENGTH[1] + 1, (1,), generator=generator))
    ids = torch.randint(3, MODEL_CONFIG["vocab_size"], (length,), generator=generator)
    ids[0] = MODEL_CONFIG["bos_token_id"]
    start = int(torch.randint(1, length - image - 1, (1,), generator=generator))
    # key_position as the reference's wrappers build it: inclusive image_end, response_start = prompt length.
    return {"seed": seed, "input_ids": ids.tolist(),
            "key_position": {"image_start": start, "image_end": start + image - 1, "response_start": length}}


class StepLog:
    """A pass-through logits processor (a `generate` argument, reference code untouched): sees every decoding
    step, the redone ones after a rollback included, with the step's input_ids and log-probs."""

    def __init__(self, prefix: int) -> None:
        self.prefix = prefix  # input_ids before the response: 1 dummy BOS with inputs_embeds, else the prompt
        self.lengths: list[int] = []
        self.top: list[list[float]] = []

    def __call__(self, input_ids, scores):
        self.lengths.append(int(input_ids.shape[1]) - self.prefix)  # response tokens before this step
        self.top.append([round(float(v), 5) for v in scores.max(dim=-1).values])
        return scores


class ForwardLog:
    """Wraps the model's forward (instance attribute, reference code untouched) to see the reference's
    rollbacks: every prefill after the first (inputs_embeds, no cache) is a rollback's re-prefill."""

    def __init__(self, model, prompt_length: int) -> None:
        self.model = model
        self.prompt_length = prompt_length
        self.forward = type(model).forward.__get__(model)
        self.prefills: list[int] = []
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if kwargs.get("inputs_embeds") is not None and kwargs.get("past_key_values") is None:
            self.prefills.append(int(kwargs["inputs_embeds"].shape[1]))
        return self.forward(*args, **kwargs)

    def __enter__(self):
        self.model.forward = self
        return self

    def __exit__(self, *exc):
        del self.model.forward


def _bind_window(model, window_size: int | None):
    if window_size is None:
        return None
    model.opera_beam_search = functools.partial(type(model).opera_beam_search, model, window_size=window_size)
    return window_size


def transformers_module():
    import transformers

    return transformers


def run_one(model, kind: str, params: dict, prompt: dict) -> dict:
    ids = torch.tensor([prompt["input_ids"]])
    embeds = model.model.embed_tokens(ids)
    mask = torch.ones_like(ids)
    params = dict(params)
    max_new = params.pop("max_new_tokens")
    window = params.pop("window_size", None)
    steps = StepLog(len(prompt["input_ids"]) if kind == "beam_input_ids" else 1)
    prompt_inputs = dict(input_ids=ids) if kind == "beam_input_ids" else dict(inputs_embeds=embeds)
    kwargs = dict(**prompt_inputs, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                  num_beams=params.pop("num_beams"), return_dict_in_generate=True,
                  logits_processor=transformers_module().LogitsProcessorList([steps]))
    if kind == "opera":
        # output_scores must stay off: opera_beam_search then calls .copy() on the beam_indices tuple and fails.
        kwargs.update(opera_decoding=True, output_attentions=True, key_position=prompt["key_position"], **params)
    else:
        kwargs.update(output_scores=True)
    _bind_window(model, window)
    try:
        with torch.no_grad(), ForwardLog(model, len(prompt["input_ids"])) as log:
            out = model.generate(**kwargs)
    finally:
        if window is not None:
            del model.opera_beam_search
    sequence = out.sequences[0].tolist()
    # With inputs_embeds the reference's input_ids start as one dummy BOS, else as the prompt: drop them.
    tokens = sequence[len(ids[0]):] if kind == "beam_input_ids" else sequence[1:]
    record = {"seed": prompt["seed"], "output_ids": tokens, "decoding_steps": len(steps.lengths),
              "step_lengths": steps.lengths, "step_top_logprobs": steps.top, "forwards": log.calls}
    if out.sequences_scores is not None:
        record["sequence_score"] = float(out.sequences_scores[0])
    if kind == "opera":
        # Re-prefill length P + (position - 1): position = the response position re-chosen by the rollback.
        positions = [length - len(prompt["input_ids"]) + 1 for length in log.prefills[1:]]
        record.update(rollbacks=len(positions), rollback_positions=positions)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="local checkout of shikiw/OPERA")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    import safetensors.torch
    import transformers

    utils_file = args.reference / "transformers-4.29.2/src/transformers/generation/utils.py"
    installed = Path(transformers.__file__).parent / "generation/utils.py"
    if installed.read_bytes() != utils_file.read_bytes():
        print(f"error: {installed} is not the reference's {utils_file}: run make_venv.sh", file=sys.stderr)
        return 2
    try:
        commit = subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("OPERA_COMMIT", "unknown")
    torch.set_num_threads(1)
    model = build_model(transformers)
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "rotary_emb" not in k}
    safetensors.torch.save_file(state, str(args.out / "tiny_llama.safetensors"))
    prompts = [make_prompt(seed) for seed in range(max(n for _, _, n, _ in SETTINGS))]
    meta = {"reference": "shikiw/OPERA", "reference_commit": commit, "transformers": transformers.__version__,
            "torch": torch.__version__, "utils_py_sha256": hashlib.sha256(utils_file.read_bytes()).hexdigest(),
            "model_config": MODEL_CONFIG, "model_seed": MODEL_SEED, "weight_gain": WEIGHT_GAIN,
            "weights": "tiny_llama.safetensors", "dtype": "float32", "device": "cpu"}
    for name, kind, count, params in SETTINGS:
        runs = [{**prompts[i], **run_one(model, kind, params, prompts[i])} for i in range(count)]
        fixture = {**meta, "setting": name, "kind": kind, "params": params, "runs": runs}
        (args.out / f"{name}.json").write_text(json.dumps(fixture, indent=1) + "\n")
        rollbacks = sum(r.get("rollbacks", 0) for r in runs)
        eos = sum(r["output_ids"][-1:] == [MODEL_CONFIG["eos_token_id"]] for r in runs)
        print(f"{name}: {count} runs, {rollbacks} rollbacks, {eos} end in EOS", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
