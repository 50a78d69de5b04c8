"""Train the shapes model from scratch, on CPU, deterministically given the seed.

    python -m vlmscope.shapes.train --out src/vlmscope/data/models/shapes --seed 0

Scenes are sampled and rendered on the fly from a seeded stream. Each training step encodes a batch of
images once and asks several questions about each image: the decoder runs the shared prefix
("<s> USER: <image>x64") once, its key/value cache is repeated for every question, and only the question
and answer tokens are run per question. That is exactly the computation of the full sequences (causal
attention: the prefix never sees what follows it), at a fraction of the cost, which is what makes a
from-scratch model that sees fit in a CPU budget. The loss is cross-entropy on the answer tokens, plus
training-only auxiliary losses: patch labels on the image tokens, a probe of the named object's state, and a
pointer loss that teaches one decoder head (`POINTER_LAYER`, `POINTER_HEAD`) to attend from the words about an
object to that object's patches (grounding supervision; without it a 2-core CPU budget ends with a model that
answers "yes" to every existence question).

The run is a fixed number of steps (deterministic); `--minutes` is only a safety cap that stops early.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vlmscope.models.families_seed import model_forward
from vlmscope.shapes.build import DEFAULT_SIZE, build_model
from vlmscope.shapes.vocab import CATEGORIES, COLOURS
from vlmscope.shapes.world import (
    DEFAULT_WORLD,
    Question,
    Scene,
    patch_labels,
    sample_scene,
    training_question,
)

# CLIP's normalisation constants (what CLIPImageProcessorPil applies); tests check the two agree.
_CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def pixel_values(scenes: list[Scene]) -> torch.Tensor:
    """The processor's pixel_values for rendered scenes, computed directly (the images are already the
    model's input size, so resize and crop are identities): rescale, normalise, channels first."""
    arr = np.stack([np.asarray(s.image(), dtype=np.float32) / 255.0 for s in scenes])
    arr = (arr - _CLIP_MEAN) / _CLIP_STD
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


class Encoder:
    """Token ids of the prompt pieces, memoised (the set of distinct strings is small)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self._cache: dict[str, list[int]] = {}
        n_img = DEFAULT_SIZE.num_image_tokens
        # "<s> USER: <image>...": what the chat template and processor produce before the question text.
        self.prefix = [tokenizer.bos_token_id] + self.ids("USER:") + [tokenizer.convert_tokens_to_ids("<image>")] * n_img

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def suffix(self, q: Question) -> tuple[list[int], list[int], int]:
        """(ids, labels, probe position) of "{question} ASSISTANT: {answer}</s>". Labels are -100 except on
        the answer; the probe position is the last prompt token of a question about an object (-1: none)."""
        prompt = self.ids(f"{q.text} ASSISTANT:")
        answer = self.ids(q.answer) + [self.tok.eos_token_id]
        ids = prompt + answer
        # labels[t] is the target predicted at position t, i.e. ids[t + 1], answer part only.
        labels = [-100] * (len(prompt) - 1) + answer + [-100]
        # The probe reads the last prompt token, where the answer is decided.
        pos = len(prompt) - 1 if q.category is not None and q.kind != "caption" else -1
        return ids, labels, pos

    def pointer_targets(self, q: Question, ids: list[int], prompt_len: int, scene: Scene) -> list[tuple[int, int]]:
        """(query position, target) pairs for the pointer loss: target 1 + category index = "attend to that
        object's patches", 0 = "attend to the BOS sink" (the object asked about is absent).

        Captions: the three positions that predict an object's article, colour and category (the token before
        the article, the article, the colour word) point at that object. Questions: the word naming the object
        asked about and the last prompt token (which predicts the answer) point at it when present, at the sink
        when absent: then whether the object is there is plain in that head's output."""
        cat_ids = {self.tok.convert_tokens_to_ids(c): i for i, c in enumerate(CATEGORIES)}
        out: list[tuple[int, int]] = []
        if q.kind == "caption":
            for j in range(prompt_len, len(ids)):
                if ids[j] in cat_ids:
                    out += [(j - k, 1 + cat_ids[ids[j]]) for k in (3, 2, 1)]
        elif q.category is not None:
            cat = CATEGORIES.index(q.category)
            pos = max(i for i in range(prompt_len) if ids[i] == self.tok.convert_tokens_to_ids(q.category))
            target = 1 + cat if q.category in scene.categories else 0
            out += [(pos, target), (prompt_len - 1, target)]
        return out


class Batch:
    """One training step's tensors. Rows of `ids` are grouped by image: `ids.shape[0] // n_images` rows each."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.pixels: torch.Tensor = tensors["pixels"]
        self.ids: torch.Tensor = tensors["ids"]
        self.labels: torch.Tensor = tensors["labels"]
        self.patch_cats: torch.Tensor = tensors["patch_cats"]
        self.patch_colours: torch.Tensor = tensors["patch_colours"]
        self.probe_pos: torch.Tensor = tensors["probe_pos"]
        self.probe_target: torch.Tensor = tensors["probe_target"]
        self.pointer: torch.Tensor = tensors["pointer"]  # [M, 4]: row, query position, image index, target
        self.copy: torch.Tensor = tensors["copy"]  # [M, 3]: row, query position, position of the object's name
        self.is_yes_no: torch.Tensor = tensors["is_yes_no"]
        self.yes_no_accuracy = float("nan")


def _object_state(scene: Scene, category: str) -> int:
    """0 if the category is absent, else 1 + the index of its colour."""
    o = scene.get(category)
    return 0 if o is None else 1 + list(COLOURS).index(o.colour)


def make_batch(rng: random.Random, enc: Encoder, n_images: int, n_questions: int) -> Batch:
    scenes = [sample_scene(rng, DEFAULT_WORLD) for _ in range(n_images)]
    questions = [(s, training_question(s, rng)) for s in scenes for _ in range(n_questions)]
    rows = [enc.suffix(q) for _, q in questions]
    width = max(len(r[0]) for r in rows)
    pad = enc.tok.pad_token_id
    # Right padding: pads come after every real token, so causal attention keeps them out of the loss path.
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
    probe_pos = torch.tensor([max(r[2], 0) for r in rows])
    probe_target = torch.tensor(
        [_object_state(s, q.category) if r[2] >= 0 and q.category else -100 for (s, q), r in zip(questions, rows)]
    )
    pointer, copy = [], []
    for r, ((s, q), row) in enumerate(zip(questions, rows)):
        prompt_len = len(enc.ids(f"{q.text} ASSISTANT:"))
        pointer += [(r, pos, r // n_questions, t) for pos, t in enc.pointer_targets(q, row[0], prompt_len, s)]
        if row[2] >= 0:  # a question about an object: its last prompt token looks up the object's name
            cat_id = enc.tok.convert_tokens_to_ids(q.category)
            copy.append((r, prompt_len - 1, max(i for i in range(prompt_len) if row[0][i] == cat_id)))
    dense = [patch_labels(s, DEFAULT_SIZE.grid) for s in scenes]
    return Batch(
        pointer=torch.tensor(pointer, dtype=torch.long).reshape(-1, 4),
        copy=torch.tensor(copy, dtype=torch.long).reshape(-1, 3),
        is_yes_no=torch.tensor([q.label is not None for _, q in questions]),
        pixels=pixel_values(scenes),
        ids=ids,
        labels=labels,
        patch_cats=torch.from_numpy(np.stack([d[0] for d in dense]).reshape(n_images, -1)),
        patch_colours=torch.from_numpy(np.stack([d[1] for d in dense]).reshape(n_images, -1)),
        probe_pos=probe_pos,
        probe_target=probe_target,
    )


class DenseHeads(torch.nn.Module):
    """Training-only probes, discarded after training (the saved model stays stock LLaVA).

    - On the projected image tokens: which category and colour covers each patch. This dense signal teaches
      the vision tower to see within a few hundred steps, instead of waiting for the sparse caption loss.
    - On the decoder's hidden state after layer `probe_layer`, at the word naming the object asked about:
      is that object in the image, and in which colour. This asks the early decoder layers to fetch the
      named object from the image grid at its name, which is the first hop of every answer; without it
      the model sits for long on a plateau where it answers yes/no from the prior.
    (The pointer loss, `pointer_loss`, works on one attention head of the saved model itself.)
    """

    def __init__(self, hidden: int, probe_layer: int = 3) -> None:
        super().__init__()
        self.probe_layer = probe_layer
        self.category = torch.nn.Linear(hidden, len(CATEGORIES) + 1)
        self.colour = torch.nn.Linear(hidden, len(COLOURS) + 1)
        self.state = torch.nn.Linear(hidden, len(COLOURS) + 1)

    def patch_loss(self, feats: torch.Tensor, cats: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Per patch: category and colour of the object covering it; plus per object: category and colour from
        the mean of its patches' features (a patch on a star's edge is ambiguous, the star as a whole is not;
        this asks every patch of an object to carry what the object is)."""
        ce = torch.nn.functional.cross_entropy
        patch = ce(self.category(feats).flatten(0, 1), cats.flatten()) + ce(self.colour(feats).flatten(0, 1), cols.flatten())
        labels = torch.arange(1, len(CATEGORIES) + 1)
        masks = (cats[:, None, :] == labels[None, :, None]).to(feats.dtype)  # [B, categories, patches]
        present = masks.sum(-1) > 0
        pooled = torch.einsum("bkn,bnd->bkd", masks, feats) / masks.sum(-1, keepdim=True).clamp(min=1)
        colour = (cols[:, None, :] * masks.long()).amax(-1)  # every patch of an object has its colour
        cat_target = labels[None, :].expand_as(present)
        obj = ce(self.category(pooled[present]), cat_target[present]) + ce(self.colour(pooled[present]), colour[present])
        return patch + obj

    def probe_loss(self, hidden: torch.Tensor, pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not bool((target >= 0).any()):
            return hidden.sum() * 0.0
        at = hidden[torch.arange(hidden.shape[0]), pos]
        return torch.nn.functional.cross_entropy(self.state(at), target, ignore_index=-100)


def shared_prefix_loss(
    model, prefix: torch.Tensor, batch: Batch, heads: DenseHeads | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer-token cross-entropy, auxiliary probe loss; 0 without `heads`)."""
    n_img = batch.pixels.shape[0]
    repeats = batch.ids.shape[0] // n_img
    out = model.model(input_ids=prefix.expand(n_img, -1), pixel_values=batch.pixels, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(repeats)
    lm_out = model_forward(  # the cache under the installed transformers' name
        model.model.language_model, input_ids=batch.ids, past_key_values=cache, use_cache=True, output_hidden_states=heads is not None,
        output_attentions=heads is not None,
    )
    logits = model.lm_head(lm_out.last_hidden_state)
    lm = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=-100
    )
    with torch.no_grad():
        # Progress signal: first-answer-token accuracy of the yes/no questions (the slowest skill to form).
        first = (batch.labels >= 0).int().argmax(1)
        rows = torch.arange(len(first))
        yes_no = batch.is_yes_no
        hit = logits[rows, first].argmax(-1) == batch.labels[rows, first]
        batch.yes_no_accuracy = float(hit[yes_no].float().mean()) if bool(yes_no.any()) else float("nan")
    if heads is None:
        return lm, torch.zeros(())
    feats = out.image_hidden_states.reshape(n_img, -1, out.image_hidden_states.shape[-1])
    aux = heads.patch_loss(feats, batch.patch_cats, batch.patch_colours)
    aux = aux + heads.probe_loss(lm_out.hidden_states[heads.probe_layer], batch.probe_pos, batch.probe_target)
    aux = aux + pointer_loss(lm_out.attentions[POINTER_LAYER][:, POINTER_HEAD], batch, prefix.shape[1])
    aux = aux + copy_loss(lm_out.attentions[COPY_LAYER][:, COPY_HEAD], batch, prefix.shape[1])
    return lm, aux


# The head taught to point: attention from the words about an object to that object's patches. It makes the
# named-object lookup (the first hop of every answer) form early instead of after a long plateau, and it is
# the localization head the demo shows. Layer 2 of 4, so layers 0-1 are free to work out which object a
# caption names next, and the readout (layer 3) follows it.
POINTER_LAYER, POINTER_HEAD = 2, 0


# A head that, at the last prompt token of a question, attends to the word naming the object asked about.
# Without it the model learns to find the name at a fixed offset in "What colour is the X ?" and never finds it
# in "Is there a X in the image ?": its yes/no answers then ignore the question and stay at chance.
COPY_LAYER, COPY_HEAD = 1, 1


def copy_loss(attn: torch.Tensor, batch: Batch, prefix_len: int) -> torch.Tensor:
    """-log(attention mass on the name) at the last prompt token of questions about an object."""
    if batch.copy.numel() == 0:
        return attn.sum() * 0.0
    row, pos, name = batch.copy.unbind(1)
    return -torch.log(attn[row, pos, prefix_len + name] + 1e-6).mean()


def pointer_loss(attn: torch.Tensor, batch: Batch, prefix_len: int) -> torch.Tensor:
    """-log(attention mass on the target) at the pointer positions. `attn`: [rows, queries, keys] of the
    pointer head over the question/answer tokens (keys: the shared prefix, then the rows' own tokens)."""
    if batch.pointer.numel() == 0:
        return attn.sum() * 0.0
    row, pos, img, target = batch.pointer.unbind(1)
    probs = attn[row, pos]  # [M, keys]
    n_img = batch.patch_cats.shape[1]
    first_image = prefix_len - n_img
    on_object = (batch.patch_cats[img] == target[:, None]).to(probs.dtype)  # [M, grid*grid]
    mass = (probs[:, first_image:prefix_len] * on_object).sum(-1)
    mass = torch.where(target == 0, probs[:, 0], mass)  # absent object: the BOS sink
    return -torch.log(mass + 1e-6).mean()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def _adamw(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in named:
        (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )


def vision_batch(rng: random.Random, n_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scenes = [sample_scene(rng, DEFAULT_WORLD) for _ in range(n_images)]
    dense = [patch_labels(s, DEFAULT_SIZE.grid) for s in scenes]
    cats = torch.from_numpy(np.stack([d[0] for d in dense]).reshape(n_images, -1))
    cols = torch.from_numpy(np.stack([d[1] for d in dense]).reshape(n_images, -1))
    return pixel_values(scenes), cats, cols


def image_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image tokens the decoder receives, (batch, grid*grid, hidden)."""
    cfg = model.config
    feats = model.model.get_image_features(
        pixel_values=pixels,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    ).pooler_output
    return torch.stack(list(feats))


def training_notes(run: dict, argv: list[str] | None) -> str:
    """The model card written next to the weights: how they were made and what they score."""
    args = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# shapes: a tiny LLaVA trained on the shapes world",
        "",
        "Stock `LlavaForConditionalGeneration` (CLIP ViT + LLaVA projector + Llama decoder), trained from scratch",
        "on CPU by `vlmscope.shapes.train`, deterministic for a seed:",
        "",
        f"    python -m vlmscope.shapes.train {args}",
        "",
        f"- stage 1 (vision tower + projector on patch labels): {run['vision_steps_done']} steps x "
        f"{run['vision_images_per_step']} images, {run['vision_minutes']} min",
        f"- stage 2 (whole model on captions and questions): {run['steps_done']} steps x {run['images_per_step']} "
        f"images x {run['questions_per_image']} questions",
        f"- wall time {run['train_minutes']} min ({run['threads']} thread(s), torch {run['torch']})",
    ]
    held = run.get("heldout")
    if held:
        lines += [
            "",
            f"Held-out scenes ({held['n']}, test stream, seed {held['seed']}), greedy, percent:",
            "",
            "| object recall | POPE accuracy (mean of 3 splits) | CHAIR_S | CHAIR_I | colour accuracy |",
            "|---|---|---|---|---|",
            f"| {held['object_recall']:.1f} | {held['pope_accuracy']:.1f} | {held['CHAIR_S']:.1f} | "
            f"{held['CHAIR_I']:.1f} | {held['colour_accuracy']:.1f} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the shapes VLM from scratch (CPU, seeded).")
    ap.add_argument("--out", required=True, help="output model directory (overwritten)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision-steps", type=int, default=1200, help="stage 1: vision tower + projector on patch labels")
    ap.add_argument("--vision-images", type=int, default=32, help="stage 1 images per step")
    ap.add_argument("--steps", type=int, default=2000, help="stage 2: whole model on questions and captions")
    ap.add_argument("--images", type=int, default=16, help="stage 2 images per step")
    ap.add_argument("--questions", type=int, default=6, help="stage 2 questions per image per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--dense-weight", type=float, default=0.5, help="stage 2 weight of the training-only probe losses")
    ap.add_argument("--minutes", type=float, default=29.0, help="safety cap: stop early and save after this")
    # One thread: on a shared 2-core machine two OpenMP threads stall each other whenever one is descheduled.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-n", type=int, default=200, help="held-out scenes for the final evaluation (0: skip)")
    ap.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out scene stream for that evaluation")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(f"shapes:train:{args.seed}")
    model, processor = build_model(seed=args.seed)
    model.train()
    enc = Encoder(processor.tokenizer)
    prefix = torch.tensor([enc.prefix])
    heads = DenseHeads(model.config.text_config.hidden_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M", flush=True)

    def over_time() -> bool:
        return time.time() - t0 > args.minutes * 60

    # Stage 1: learn to see. A ViT from scratch needs ~1-2k steps before shapes become separable; a
    # vision-only step costs a fraction of a full step, so the decoder does not wait through that.
    vision_named = [
        (n, p) for n, p in list(model.named_parameters()) + list(heads.named_parameters())
        if n.startswith(("model.vision_tower", "model.multi_modal_projector", "category", "colour"))
    ]  # fmt: skip
    opt = _adamw(vision_named, args.lr, args.weight_decay)
    print(f"stage 1: {args.vision_steps} steps x {args.vision_images} images", flush=True)
    vision_done = 0
    for step in range(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vision_steps, args.lr, args.warmup)
        pixels, cats, cols = vision_batch(rng, args.vision_images)
        loss = heads.patch_loss(image_tokens(model, pixels), cats, cols)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in vision_named], 1.0)
        opt.step()
        vision_done = step + 1
        if step % 200 == 0 or vision_done == args.vision_steps:
            print(f"vision step {vision_done}/{args.vision_steps} patch loss {loss.item():.4f} {(time.time() - t0) / 60:.1f} min", flush=True)
        if over_time():
            break
    vision_minutes = (time.time() - t0) / 60

    # Stage 2: the whole model on captions and questions, keeping the probes as auxiliary losses. It reads
    # the pointer head's attention probabilities, which only eager attention returns.
    model.set_attn_implementation("eager")
    named = list(model.named_parameters()) + list(heads.named_parameters())
    opt = _adamw(named, args.lr, args.weight_decay)
    print(f"stage 2: {args.steps} steps x {args.images} images x {args.questions} questions", flush=True)
    done = 0
    ema = None
    for step in range(args.steps if not over_time() else 0):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = make_batch(rng, enc, args.images, args.questions)
        lm, dense = shared_prefix_loss(model, prefix, batch, heads if args.dense_weight > 0 else None)
        opt.zero_grad(set_to_none=True)
        (lm + args.dense_weight * dense).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        done = step + 1
        ema = lm.item() if ema is None else 0.98 * ema + 0.02 * lm.item()
        if step % 50 == 0 or done == args.steps:
            print(
                f"step {done}/{args.steps} loss {lm.item():.4f} ema {ema:.4f} aux {dense.item():.4f} "
                f"yes/no acc {batch.yes_no_accuracy:.2f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
        if over_time():
            print(f"time cap of {args.minutes} min reached at step {done}; stopping early (run not at its planned length)", flush=True)
            break

    train_minutes = (time.time() - t0) / 60
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.eval()
    model.set_attn_implementation("sdpa")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    run = {
        "seed": args.seed,
        "vision_steps_done": vision_done,
        "vision_steps_planned": args.vision_steps,
        "vision_images_per_step": args.vision_images,
        "vision_minutes": round(vision_minutes, 2),
        "steps_done": done,
        "steps_planned": args.steps,
        "images_per_step": args.images,
        "questions_per_image": args.questions,
        "images_seen": done * args.images,
        "questions_seen": done * args.images * args.questions,
        "lr": args.lr,
        "dense_weight": args.dense_weight,
        "train_minutes": round(train_minutes, 2),
        "final_loss_ema": round(ema or float("nan"), 4),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    print(json.dumps(run), flush=True)

    if args.eval_n > 0:
        from vlmscope.shapes.evaluate import evaluate_model

        metrics = evaluate_model(out, n=args.eval_n, seed=args.eval_seed)
        run["heldout"] = metrics
        print(json.dumps(metrics), flush=True)
    (out / "training_run.json").write_text(json.dumps(run, indent=2) + "\n")
    (out / "TRAINING.md").write_text(training_notes(run, argv))
    print(f"total {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
