"""Resolve a model reference (built-in name, local directory, hub id) to (model, processor)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vlmscope.errors import InputError, UnsupportedModelError

log = logging.getLogger(__name__)

BUILTIN_TINY = {"tiny-llava": "llava", "tiny-llava-next": "llava-next", "tiny-qwen2-vl": "qwen2-vl"}
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "data" / "models"


def builtin_names() -> list[str]:
    names = list(BUILTIN_TINY)
    if EMBEDDED_DIR.is_dir():
        names += sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "config.json").is_file())
    return names


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return names[str(dtype).replace("torch.", "")]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model_and_processor(ref: str, device: Any = None, dtype: Any = None) -> tuple[Any, Any, str]:
    """Return (model, processor, model_id). Only a hub id can trigger a download."""
    device = resolve_device(device)
    torch_dtype = _dtype(dtype)
    if ref in BUILTIN_TINY:
        from vlmscope.models.tiny import build_tiny

        # Built fresh on each load (under a second), so no caller sees another's dtype or device changes.
        model, processor = build_tiny(BUILTIN_TINY[ref])
        model = model.to(device=device, dtype=torch_dtype) if torch_dtype else model.to(device)
        return model, processor, ref
    path = Path(ref).expanduser()
    if not path.exists() and (EMBEDDED_DIR / ref).is_dir():
        path = EMBEDDED_DIR / ref
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"{path} has no config.json: point to a saved model directory")
        source = str(path)
    elif ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        source = ref  # a hub id: the only case where transformers may download
    else:
        raise InputError(
            f"model {ref!r} not found: give a hub id (org/name), a local directory, or one of "
            f"{', '.join(builtin_names())}"
        )
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmscope.models.adapters import ADAPTERS

    config = AutoConfig.from_pretrained(source)
    supported = {t for cls in ADAPTERS for t in cls.model_types}
    if config.model_type not in supported:
        raise UnsupportedModelError(
            f"unsupported model type {config.model_type!r}: vlmscope supports {', '.join(sorted(supported))}"
        )
    kwargs: dict[str, Any] = {}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).to(device).eval()
    processor = load_processor(source, config.model_type)
    return model, processor, ref


def load_processor(source: str, model_type: str) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source)
    except (OSError, ImportError, ValueError, TypeError) as exc:
        if model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise
        # The stock Qwen processor wants a video processor, which needs torchvision; images do not.
        log.info("building an image-only Qwen processor (%s)", exc)
        return _image_only_qwen_processor(source, model_type)


def _image_only_qwen_processor(source: str, model_type: str) -> Any:
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from vlmscope.models.tiny import image_only_qwen_processor

    base = transformers.Qwen2VLProcessor if model_type == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    tokenizer = AutoTokenizer.from_pretrained(source)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(source)
    template = getattr(tokenizer, "chat_template", None)
    template_file = Path(source) / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text()
    return image_only_qwen_processor(base)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )
