"""vlmscope: see how vision-language models use the image, and steer them to hallucinate less."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmscope.errors import InputError, UnsupportedModelError, VlmscopeError

__version__ = "0.1.0"
__all__ = ["VLM", "InputError", "UnsupportedModelError", "VlmscopeError", "__version__", "load", "load_result"]


def load_result(out_dir: Any, **kwargs: Any) -> Any:
    """Read a saved result folder back by the kind in its run.json: explain, flow, heads, or an eval run
    (see `vlmscope.results.load`)."""
    from vlmscope.results import load as _load

    return _load(out_dir, **kwargs)


def __getattr__(name: str) -> Any:
    # `vlmscope.VLM` on first use, so that importing vlmscope stays light.
    if name == "VLM":
        from vlmscope.api import VLM

        return VLM
    raise AttributeError(f"module 'vlmscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Only the public names; submodules (vlmscope.explain, ...) are imported by their full name.
    return sorted(__all__)

if TYPE_CHECKING:  # pragma: no cover
    from vlmscope.api import VLM


def load(model: str, device: str | None = None, dtype: Any = None, **options: Any) -> VLM:
    """Load a vision-language model by hub id, local directory or built-in name (see `vlmscope.api.load` for
    the options: revision, attn_implementation, device_map, quantization_config)."""
    from vlmscope.api import load as _load

    allowed = {"revision", "attn_implementation", "device_map", "quantization_config"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"vlmscope.load() got unknown option(s) {', '.join(unknown)}; "
                         f"options: {', '.join(sorted(allowed))}")
    return _load(model, device=device, dtype=dtype, **options)
