"""One protocol for saved results: explain, flow, heads and evaluation runs.

Every saved result directory holds `run.json` = {"kind": ..., "provenance": provenance(...), ...kind specific}.
The provenance record (`vlmscope.provenance.provenance`) says what produced the numbers: vlmscope, transformers
and torch versions, model id and revision, the method specs with all parameters, seed, device, dtype, wall time.

Result classes (`ExplainResult` kind "explain", `FlowResult` "flow", `HeadRanking` "heads") have
`save(dir)`, the classmethod `load(dir)` and `to_json()`; `vlmscope.results.load(dir)` reads any of them by
the kind in its run.json. Evaluation run folders (kinds "eval-chair" and "eval-pope", written by
`vlmscope.eval`) load as a read-only `EvalRun` view of their run.json and metrics.json.

This module sits beside `provenance`: it imports no model code, and the result classes are found by name when
`load` dispatches, so explain → results is the only direction of the dependency.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from vlmscope.errors import InputError
from vlmscope.provenance import provenance

RUN_FILE = "run.json"

# kind → (module, class) of the result type that reads it; imported only when such a folder is loaded.
RESULT_TYPES: dict[str, tuple[str, str]] = {
    "explain": ("vlmscope.explain.maps", "ExplainResult"),
    "flow": ("vlmscope.explain.flow", "FlowResult"),
    "heads": ("vlmscope.explain.heads", "HeadRanking"),
    "lens": ("vlmscope.explain.causal", "LensResult"),
    "ablate": ("vlmscope.explain.causal", "AblationResult"),
    "patch": ("vlmscope.explain.causal", "PatchResult"),
    "eval-chair": ("vlmscope.results", "EvalRun"),
    "eval-pope": ("vlmscope.results", "EvalRun"),
}


class Result(Protocol):
    """What every saved result offers."""

    kind: ClassVar[str]
    provenance: dict[str, Any]

    def save(self, out_dir: str | Path) -> dict[str, Any]: ...

    @classmethod
    def load(cls, out_dir: str | Path) -> Result: ...

    def to_json(self) -> dict[str, Any]: ...


# --- writing ------------------------------------------------------------------------------------------------
def json_safe(obj: Any) -> Any:
    """JSON has no infinity or NaN (an infinite entropy, a 0/0 share): write such floats as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def run_provenance(vlm: Any, *, decoding: Any = None, interventions: Iterable[Any] = (), seed: int | None = None,
                   wall_seconds: float | None = None, **extra: Any) -> dict[str, Any]:
    """`provenance(...)` filled in from a loaded `VLM`: model id, revision, device and dtype."""
    config = getattr(getattr(vlm, "model", None), "config", None)
    # A hub checkpoint records the commit it was loaded from; local directories and tiny models have none.
    revision = getattr(vlm, "revision", None) or getattr(config, "_commit_hash", None)
    return provenance(model_id=getattr(vlm, "model_id", None), revision=revision, decoding=decoding,
                      interventions=interventions, seed=seed, device=getattr(vlm, "device", None),
                      dtype=getattr(vlm, "dtype", None), wall_seconds=wall_seconds, **extra)


def check_output_dir(out_dir: str | Path, kind: str) -> Path:
    """Refuse, with one line and before any work, an output path that is a file or holds another kind's result."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a directory (it is created if missing)")
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text()).get("kind")
        except (json.JSONDecodeError, AttributeError):
            previous = None
        if previous != kind:
            raise InputError(f"{out} holds a {previous or 'foreign'} result, not {kind}: choose a new directory")
    return out


def prepare_output_dir(out_dir: str | Path, kind: str, owned: Iterable[str] = ()) -> Path:
    """Make `out_dir` ready for a result of `kind` (`check_output_dir`), then delete the files an earlier save
    of this kind wrote (glob patterns `owned`), so a re-run leaves no stale overlays behind."""
    out = check_output_dir(out_dir, kind)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in owned:
        for stale in out.glob(pattern):
            if stale.is_file():
                stale.unlink()
    return out


def write_run(out_dir: str | Path, kind: str, record: dict[str, Any]) -> Path:
    """Write `run.json` = {"kind": kind, **record} (non-finite floats as null); returns its path."""
    path = Path(out_dir) / RUN_FILE
    path.write_text(json.dumps(json_safe({"kind": kind, **record}), indent=2))
    return path


# --- reading ------------------------------------------------------------------------------------------------
def read_run(out_dir: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The run.json of a result folder; `kind` given: it must be that kind. Bad folders → one-line InputError."""
    out = Path(out_dir)
    path = out / RUN_FILE
    if not path.is_file():
        raise InputError(f"{out} has no {RUN_FILE}: point to a directory written by vlmscope")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(record, dict) or "kind" not in record:
        raise InputError(f"{path} has no \"kind\": it was not written by this version of vlmscope")
    if kind is not None and record["kind"] != kind:
        raise InputError(f"{out} holds a {record['kind']!r} result, not {kind!r}: use vlmscope.results.load")
    return record


def load(out_dir: str | Path, **kwargs: Any) -> Any:
    """Read any saved result folder by the kind in its run.json (`image=` for explain/flow re-attaches the
    image for plotting)."""
    record = read_run(out_dir)
    kind = record["kind"]
    if kind not in RESULT_TYPES:
        raise InputError(f"unknown result kind {kind!r} in {Path(out_dir) / RUN_FILE}: known kinds are "
                         f"{', '.join(RESULT_TYPES)}")
    module, name = RESULT_TYPES[kind]
    reader = getattr(importlib.import_module(module), name).load
    unknown = sorted(set(kwargs) - set(inspect.signature(reader).parameters))
    if unknown:
        raise InputError(f"a {kind} result takes no {', '.join(unknown)} when loaded: drop the argument")
    return reader(out_dir, **kwargs)


# --- evaluation runs (read-only) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalRun:
    """A read-only view of an evaluation run folder: its kind, settings, provenance and metrics.

    The folder is written by `vlmscope eval` (run.json {"kind", "settings", "provenance"} beside the stored
    rows and metrics.json); `metrics` is None while the run has not been scored yet.
    """

    kind: str
    path: Path
    settings: dict[str, Any]
    provenance: dict[str, Any]
    metrics: dict[str, Any] | None = None
    kinds: ClassVar[tuple[str, ...]] = ("eval-chair", "eval-pope")

    @classmethod
    def load(cls, out_dir: str | Path) -> EvalRun:
        out = Path(out_dir)
        record = read_run(out)
        if record["kind"] not in cls.kinds:
            raise InputError(f"{out} holds a {record['kind']!r} result, not an evaluation run")
        metrics = None
        if (out / "metrics.json").is_file():
            try:
                metrics = json.loads((out / "metrics.json").read_text())
            except json.JSONDecodeError as err:
                raise InputError(f"{out / 'metrics.json'} is not valid JSON ({err.msg})") from None
        return cls(record["kind"], out, dict(record.get("settings") or {}), dict(record.get("provenance") or {}),
                   metrics)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "settings": self.settings,
                "provenance": self.provenance, "metrics": self.metrics}

    def __repr__(self) -> str:
        scored = "scored" if self.metrics is not None else "not scored"
        return f"EvalRun({self.kind!r}, {str(self.path)!r}, model={self.provenance.get('model')!r}, {scored})"
