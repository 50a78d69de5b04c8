"""lmms-eval plug-in: any lmms-eval task with any vlmscope decoding and interventions.

    lmms-eval --model vlmscope \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,decoding=opera:num_beams=5,interventions=pai:alpha=0.2 \\
        --tasks pope --batch_size 8

vlmscope's own benchmarks (POPE on MSCOCO / A-OKVQA / GQA, AMBER), scored by vlmscope, are lmms-eval tasks in
`vlmscope.integrations.lmms_tasks`: `--include_path "$(vlmscope lmms-tasks-path)" --tasks vlmscope_pope_gqa_random`.

Registered through the `lmms_eval.models` entry point (`manifests` below), so stock `pip install lmms-eval`
finds it once vlmscope is installed; lmms-eval is imported only here, and nothing in vlmscope imports this.

model_args (lmms-eval splits them on commas outside quotes):
- `pretrained`: anything `vlmscope.load` takes (hub id, local directory, built-in name); `revision`, `device`,
  `dtype` go to it as well.
- `decoding`: one registry spec (`beam:num_beams=5`). A spec with several parameters has commas, so quote it:
  `decoding="opera:num_beams=5,scale_factor=50"`. Without `decoding` each request group decodes as its task's
  gen_kwargs say (see `decoding_from_gen_kwargs`).
- `interventions`: specs joined by `+` (`interventions=pai:alpha=0.2+vcd`), applied in that order; quote it when
  a spec has commas.
- `batch_size`, `max_new_tokens` (used when a task's gen_kwargs have none; default 128), `seed` (sampling).
- `provenance`: a JSON file the provenance record is written to at load and after each request type.

Requests: `generate_until` in batches of `batch_size` (lmms-eval's Collator groups equal gen_kwargs), answers in
request order, cut at the task's `until` strings after decoding (as lmms-eval's built-in HF models cut; a beam
search runs to EOS or `max_new_tokens` first); `loglikelihood` teacher-forced with the interventions, one request
at a time, returning lmms-eval's built-in models' mean token loss (see `loglikelihood`); one image per
document. Sampled answers depend on the batch (one seeded generator per batch).

Specs parse through the registries exactly as on vlmscope's command line (same errors). The settings actually
used (`vlmscope.provenance.provenance` with full spec strings, every parameter, and the decoding each request
group ran) are logged on stderr at load and after each request type, written to `provenance=` when given, and
kept on the model (`.provenance_record()`). lmms-eval 0.7.3's results file records only the `--model_args`
string as given, so the provenance file is what says the defaults; with `simple_evaluate(model=<this object>)`
the results' `config.model` is `model_name`, the model with its full spec strings.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vlmscope.errors import InputError

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as exc:  # pragma: no cover - only without lmms-eval
    raise ImportError("vlmscope's lmms-eval plug-in needs lmms-eval: pip install lmms-eval==0.7.3 'filelock<4'") \
        from exc

log = logging.getLogger(__name__)

MODEL_ID = "vlmscope"
INTERVENTION_SEPARATOR = "+"
DEFAULT_MAX_NEW_TOKENS = 128
# lmms-eval's own few-shot delimiter, its default `until` when a task gives none.
DEFAULT_UNTIL = ("\n\n",)


def _unquote(value: Any) -> Any:
    """lmms-eval keeps the quotes that protect commas in a model_args value; drop one matching pair."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_decoding(spec: Any) -> Any:
    """The decoding method of a `decoding=` model arg (None: follow each task's gen_kwargs)."""
    from vlmscope.decoding import DECODINGS

    spec = _unquote(spec)
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    return DECODINGS.parse(str(spec))


def parse_interventions(specs: Any) -> list[Any]:
    """The interventions of an `interventions=` model arg: registry specs joined by `+`, in order."""
    from vlmscope.interventions import INTERVENTIONS

    specs = _unquote(specs)
    if specs is None:
        return []
    parts = [part.strip() for part in str(specs).split(INTERVENTION_SEPARATOR)]
    if any(not part for part in parts) and str(specs).strip():
        raise InputError(f"empty intervention in interventions={specs!r}: join specs with a single "
                         f"'{INTERVENTION_SEPARATOR}', e.g. interventions=pai:alpha=0.2{INTERVENTION_SEPARATOR}vcd")
    return [INTERVENTIONS.parse(part) for part in parts if part]


def decoding_from_gen_kwargs(gen_kwargs: dict[str, Any], seed: int = 0) -> Any:
    """The vlmscope decoding a task's gen_kwargs ask for, read as lmms-eval's built-in LLaVA (`llava_hf`) reads
    them, so numbers compare with its: sampling when `temperature` > 0 (with `top_p` / `top_k` when given;
    `do_sample` is not consulted, as there), beam search when `num_beams` > 1, greedy otherwise."""
    from vlmscope.decoding import DECODINGS

    temperature = float(gen_kwargs.get("temperature") or 0.0)
    num_beams = int(gen_kwargs.get("num_beams") or 1)
    if temperature > 0:
        if num_beams > 1:
            raise InputError(f"the task asks for beam sampling (num_beams={num_beams}, temperature={temperature}), "
                             "which vlmscope has no decoding for: pass decoding=beam:num_beams=N or decoding=sample")
        params: dict[str, Any] = {"temperature": temperature, "seed": seed}
        if gen_kwargs.get("top_p") is not None:
            params["top_p"] = float(gen_kwargs["top_p"])
        if gen_kwargs.get("top_k") is not None:
            params["top_k"] = int(gen_kwargs["top_k"])
        return DECODINGS.create("sample", params)
    if num_beams > 1:
        return DECODINGS.create("beam", {"num_beams": num_beams})
    return DECODINGS.create("greedy")


def stop_strings(until: Any) -> list[str]:
    """A task's `until` as a list of non-empty stop strings (a single string is one stop string)."""
    if until is None:
        return list(DEFAULT_UNTIL)
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, Iterable):
        raise InputError(f"gen_kwargs until={until!r}: expected a string or a list of strings")
    return [str(s) for s in until if str(s)]


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string, stripped (as lmms-eval's built-in HF models cut
    their decoded text)."""
    for stop in until:
        text = text.split(stop)[0]
    return text.strip()


def _whole_number(name: str, value: Any, minimum: int = 1) -> int:
    """A whole number from model_args / gen_kwargs (lmms-eval hands over "2", 2 or 2.0 alike)."""
    try:
        number = float(value)
        if number != int(number) or number < minimum:
            raise ValueError
        return int(number)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name}={value!r}: expected a whole number >= {minimum}") from None


def _spec(method: Any) -> str:
    from vlmscope.registry import spec_string

    return spec_string(method)


class VlmscopeLMM(lmms):
    """lmms-eval simple model running a `vlmscope.VLM` with fixed interventions and a decoding method."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, decoding: str | None = None, interventions: str | None = None,
                 device: str | None = None, dtype: str | None = None, revision: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS, seed: int | str = 0,
                 provenance: str | None = None, max_batch_size: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            known = ("pretrained, decoding, interventions, device, dtype, revision, batch_size, max_new_tokens, "
                     "seed, provenance")
            raise InputError(
                f"unknown vlmscope model_args {', '.join(sorted(unknown))}; known: {known}. A decoding or "
                "intervention spec with several parameters has commas: quote it, e.g. "
                "decoding=\"opera:num_beams=5,scale_factor=50\"")
        if not pretrained:
            raise InputError("vlmscope model_args need pretrained=<hub id, local directory or built-in name>, "
                             "e.g. --model_args pretrained=llava-hf/llava-1.5-7b-hf")
        # Methods first: a misspelt spec fails before a large model loads.
        self.decoding = parse_decoding(decoding)
        self.interventions = parse_interventions(interventions)
        self.batch_size_per_gpu = _whole_number("batch_size", batch_size)
        self.max_new_tokens = _whole_number("max_new_tokens", max_new_tokens)
        self.seed = _whole_number("seed", seed, minimum=0)
        self.revision = None if revision is None else str(revision)
        self.provenance_path = None if provenance is None else Path(str(_unquote(provenance)))
        if self.provenance_path is not None and self.provenance_path.is_dir():
            raise InputError(f"provenance={self.provenance_path} is a folder; name a JSON file to write")

        import vlmscope

        start = time.perf_counter()
        self.vlm = vlmscope.load(str(pretrained), device=None if device is None else str(device),
                                 dtype=None if dtype is None else str(dtype), revision=self.revision)
        self._load_seconds = time.perf_counter() - start
        self._generate_seconds = 0.0
        # What each request group actually ran, for the provenance record.
        self._decodings_used: dict[str, int] = {}
        self._task_overridden: dict[str, str] = {}
        self.model_name = self._label()
        # What lmms-eval's `simple_evaluate(model=<object>)` reads as the model's name for its results file.
        self.config = SimpleNamespace(_name_or_path=self.model_name)
        self._report("loaded")

    # --- labels -----------------------------------------------------------------------------------------
    def _label(self) -> str:
        decoding = _spec(self.decoding) if self.decoding is not None else "from-task-gen_kwargs"
        parts = [f"vlmscope:{self.vlm.model_id}", f"decoding={decoding}"]
        if self.interventions:
            parts.append("interventions=" + INTERVENTION_SEPARATOR.join(_spec(i) for i in self.interventions))
        return " ".join(parts)

    def provenance_record(self) -> dict[str, Any]:
        """`vlmscope.provenance.provenance` for this model plus the decodings each request group ran."""
        from importlib.metadata import PackageNotFoundError, version

        from vlmscope.provenance import provenance

        try:
            lmms_eval_version = version("lmms_eval")
        except PackageNotFoundError:  # pragma: no cover - running from a source checkout
            lmms_eval_version = None
        return provenance(
            model_id=self.vlm.model_id, revision=self.revision, decoding=self.decoding,
            interventions=self.interventions, seed=self.seed, device=self.vlm.device, dtype=self.vlm.dtype,
            wall_seconds=round(self._load_seconds + self._generate_seconds, 3),
            integration={"lmms_eval": lmms_eval_version, "batch_size": self.batch_size_per_gpu,
                         "default_max_new_tokens": self.max_new_tokens,
                         # Per generation request group: the decoding spec that ran and how many requests.
                         "decodings_used": dict(self._decodings_used),
                         # Task gen_kwargs that asked for another decoding than the explicit `decoding=`.
                         "task_gen_kwargs_overridden": dict(self._task_overridden)},
        )

    def get_model_info(self) -> dict[str, Any]:
        return {"vlmscope": self.provenance_record(), "model_name": self.model_name}

    def _report(self, stage: str) -> None:
        record = self.provenance_record()
        log.warning("vlmscope lmms-eval model (%s): %s", stage, json.dumps(record, sort_keys=True))
        if self.provenance_path is not None:
            self.provenance_path.parent.mkdir(parents=True, exist_ok=True)
            self.provenance_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # --- requests ---------------------------------------------------------------------------------------
    def _image(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> Any:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = list(visuals) if isinstance(visuals, list | tuple) else [visuals]
        if len(visuals) != 1:
            raise InputError(f"task {task}: document {doc_id} has {len(visuals)} visuals; the vlmscope "
                             "plug-in takes exactly one image per document")
        return visuals[0]

    def _decoding_for(self, gen_kwargs: dict[str, Any]) -> Any:
        asked = decoding_from_gen_kwargs(gen_kwargs, seed=self.seed)
        if self.decoding is None:
            return asked
        # An explicit `decoding=` is the method under evaluation: it wins over the task's sampling / beam
        # settings, and the override is logged and recorded (never silent).
        if _spec(asked) not in ("greedy", _spec(self.decoding)):
            key = json.dumps({k: v for k, v in sorted(gen_kwargs.items()) if k != "until"}, default=str)
            if key not in self._task_overridden:
                log.warning("vlmscope: the task's gen_kwargs ask for %s; running decoding=%s as given in model_args",
                            _spec(asked), _spec(self.decoding))
            self._task_overridden[key] = _spec(asked)
        return self.decoding

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from lmms_eval.utils import Collator
        from tqdm import tqdm

        # Longest context first (as lmms-eval's built-in models): similar lengths share a padded batch.
        collator = Collator([r.args for r in requests], lambda args: (-len(args[0]), args[0]), grouping=True)
        texts: list[str] = []
        tokenizer = self.vlm.adapter.tokenizer
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="vlmscope generate_until")
        for chunk in collator.get_batched(n=self.batch_size_per_gpu, batch_fn=None):
            contexts, all_gen_kwargs, doc_to_visuals, doc_ids, tasks, splits = zip(*chunk)
            gen_kwargs = dict(all_gen_kwargs[0])  # the collator groups requests with equal gen_kwargs
            method = self._decoding_for(gen_kwargs)
            max_new_tokens = _whole_number("max_new_tokens", gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            until = stop_strings(gen_kwargs.get("until"))
            images = [self._image(*args) for args in zip(doc_to_visuals, doc_ids, tasks, splits)]
            start = time.perf_counter()
            results = self.vlm.generate(images, list(contexts), max_new_tokens=max_new_tokens, decoding=method,
                                        interventions=self.interventions)
            self._generate_seconds += time.perf_counter() - start
            spec = _spec(method)
            self._decodings_used[spec] = self._decodings_used.get(spec, 0) + len(results)
            for context, result in zip(contexts, results):
                # Cut the raw decoded text (not the stripped `.text`) at the stop strings, as lmms-eval's built-in
                # models do. Decoding runs to EOS or max_new_tokens first, so for beam searches the stop
                # strings shorten the answer after the search rather than ending hypotheses during it.
                text = cut_at_stop(tokenizer.decode(result.token_ids, skip_special_tokens=True), until)
                texts.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            progress.update(len(results))
        progress.close()
        self._report("generate_until done")
        return collator.get_original(texts)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(mean negative log-probability per continuation token, whether greedy picks every token) per request.

        The first value is what lmms-eval 0.7.3's built-in models return there (their `loss`, the mean token
        cross-entropy), not a log-likelihood: its multiple-choice scoring takes the argmin over the choices, so
        this convention keeps predictions right and comparable with its built-in LLaVA. Teacher-forced, with the
        interventions in every forward (their processed logits, as decoding sees them)."""
        if self.decoding is not None and _spec(self.decoding) != "greedy":
            raise InputError(f"decoding={_spec(self.decoding)} does not apply to loglikelihood requests "
                             "(teacher-forced scores); drop decoding= for this task (interventions do apply)")
        from tqdm import tqdm

        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="vlmscope loglikelihood"):
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target(self.task_dict[task][split][doc_id]) if callable(target) else target
            if isinstance(continuation, list | tuple):
                if len(continuation) != 1:
                    raise InputError(f"task {task}: document {doc_id} has {len(continuation)} targets; "
                                     "loglikelihood scores one continuation per request")
                continuation = continuation[0]
            start = time.perf_counter()
            logprobs, greedy = self.token_logprobs(self._image(doc_to_visual, doc_id, task, split), context,
                                                   str(continuation))
            self._generate_seconds += time.perf_counter() - start
            out.append((-sum(logprobs) / len(logprobs), greedy))
        self._report("loglikelihood done")
        return out

    def token_logprobs(self, image: Any, prompt: str, continuation: str) -> tuple[list[float], bool]:
        """The log-probability of each token of `continuation` (tokenised on its own without special tokens and fed
        after the rendered prompt, where the answer starts; one cached step per token) and whether greedy would
        pick every one."""
        from vlmscope.decoding.session import GenerationRun

        ids = self.vlm.adapter.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError(f"empty continuation {continuation!r}: loglikelihood needs at least one token")
        batch = self.vlm.encode([image], [prompt])
        values, greedy = [], True
        with torch.no_grad(), GenerationRun(self.vlm.model, self.vlm.adapter, batch, self.interventions) as run:
            logits = run.prefill()
            for position, token in enumerate(ids):
                logprobs = torch.log_softmax(logits[0].float(), dim=-1)
                values.append(float(logprobs[token]))
                greedy = greedy and int(logprobs.argmax()) == token
                if position + 1 < len(ids):
                    logits = run.advance(torch.tensor([token]))
        return values, greedy

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vlmscope lmms-eval plug-in runs generate_until and loglikelihood requests "
                                  "(single turn, one image per document); multi-round generation is not supported")


def manifests() -> Any:
    """The `lmms_eval.models` entry point: lmms-eval's model manifest for `--model vlmscope`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VlmscopeLMM")]


__all__ = ["VlmscopeLMM", "cut_at_stop", "decoding_from_gen_kwargs", "manifests", "parse_decoding",
           "parse_interventions", "stop_strings"]
