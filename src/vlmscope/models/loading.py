"""Resolve a model reference (built-in name, local directory, hub id) to (model, processor)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vlmscope.errors import InputError, UnsupportedModelError

log = logging.getLogger(__name__)

BUILTIN_TINY = {"tiny-llava": "llava", "tiny-llava-next": "llava-next", "tiny-qwen2-vl": "qwen2-vl",
                "tiny-llava-onevision": "llava-onevision", "tiny-gemma3": "gemma3", "tiny-qwen3-vl": "qwen3-vl",
                "tiny-idefics3": "idefics3", "tiny-smolvlm": "smolvlm", "tiny-internvl": "internvl",
                "tiny-instructblip": "instructblip", "tiny-minigpt4": "minigpt4", "tiny-shikra": "shikra"}
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
    """The device to load on; one that this torch cannot use is refused here, before torch asserts deep inside."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps ...") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device}: this torch build sees no CUDA GPU; use device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s); pick another index")
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device {device}: MPS is not available here; use device cpu")
    return parsed


def load_model_and_processor(ref: str, device: Any = None, dtype: Any = None, *, revision: str | None = None,
                             attn_implementation: str | None = None, device_map: Any = None,
                             quantization_config: Any = None) -> tuple[Any, Any, str]:
    """Return (model, processor, model_id). Only a hub id can trigger a download.

    `revision`, `attn_implementation`, `device_map` and `quantization_config` go to `from_pretrained`; with a
    `device_map` or a quantization config the model is placed by transformers/accelerate (no `.to(device)`).
    """
    if device_map is not None and device is not None:
        raise InputError("give either device or device_map, not both")
    placed = device_map is not None or quantization_config is not None
    device = resolve_device(device)
    torch_dtype = _dtype(dtype)
    if ref in BUILTIN_TINY:
        given = [name for name, value in (("revision", revision), ("device_map", device_map),
                                          ("quantization_config", quantization_config)) if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} cannot be used with the built-in model {ref!r} (it is built "
                             "locally, not loaded): drop the option or load a saved model directory or hub id")
        from vlmscope.models.tiny import build_tiny

        # Built fresh on each load (under a second), so no caller sees another's dtype or device changes.
        model, processor = build_tiny(BUILTIN_TINY[ref])
        model = model.to(device=device, dtype=torch_dtype) if torch_dtype else model.to(device)
        if attn_implementation is not None:
            _set_attn_implementation(model, attn_implementation)
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

    hub: dict[str, Any] = {"revision": revision} if revision is not None else {}
    config = AutoConfig.from_pretrained(source, **hub)
    from vlmscope.models.families_modern import MODERN_ADAPTERS, generic_loadable

    supported = {t for cls in (*ADAPTERS, *MODERN_ADAPTERS) for t in cls.model_types}
    if config.model_type not in supported and not generic_loadable(config):
        raise UnsupportedModelError(
            f"unsupported model type {config.model_type!r}: vlmscope supports {', '.join(sorted(supported))}"
        )
    kwargs: dict[str, Any] = dict(hub)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    for name, value in (("attn_implementation", attn_implementation), ("device_map", device_map),
                        ("quantization_config", quantization_config)):
        if value is not None:
            kwargs[name] = value
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except (ValueError, ImportError) as exc:
        if attn_implementation is None and device_map is None and quantization_config is None:
            raise
        raise InputError(f"cannot load {ref} with these options: {str(exc).splitlines()[0]}") from None
    model = (model if placed else model.to(device)).eval()
    ln_vision_eps = getattr(model.config, "ln_vision_eps", None)
    if ln_vision_eps is not None:
        # MiniGPT-4's ln_vision (eps 1e-5) is stock BLIP-2's post_layernorm, built with the ViT's eps (1e-6).
        model.vision_model.post_layernorm.eps = float(ln_vision_eps)
    processor = load_processor(source, config.model_type, **hub)
    return model, processor, ref


def _set_attn_implementation(model: Any, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as exc:
        raise InputError(f"attn_implementation={name!r} is not available: {str(exc).splitlines()[0]}") from None


def load_processor(source: str, model_type: str, **hub: Any) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, **hub)
    except (OSError, ImportError, ValueError, TypeError) as exc:
        from vlmscope.models.families_modern import VIDEO_PROCESSOR_TYPES, load_image_only_processor

        if model_type in VIDEO_PROCESSOR_TYPES:
            log.info("building an image-only %s processor (%s)", model_type, exc)
            return load_image_only_processor(source, model_type, **hub)
        if model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise
        # The stock Qwen processor wants a video processor, which needs torchvision; images do not.
        log.info("building an image-only Qwen processor (%s)", exc)
        return _image_only_qwen_processor(source, model_type, **hub)


def _image_only_qwen_processor(source: str, model_type: str, **hub: Any) -> Any:
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from vlmscope.models.tiny import image_only_qwen_processor

    base = transformers.Qwen2VLProcessor if model_type == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(source, **hub)
    template = getattr(tokenizer, "chat_template", None)
    template_file = Path(source) / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text()
    return image_only_qwen_processor(base)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )
