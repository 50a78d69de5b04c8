"""Tiny random vision-language models built offline (tests, CI, `vlmscope tiny-model`).

Each model uses the stock transformers classes of its family, a word-level tokenizer over a small vocabulary,
the family's PIL image processor (torchvision is not required) and a chat template that places the image the
way the real checkpoints do. Weight matrices are scaled up after the random init so greedy generations vary
instead of repeating one token, which makes equivalence tests between decoding paths meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llava", "llava-next", "qwen2-vl", "llava-onevision", "gemma3", "qwen3-vl", "idefics3", "smolvlm",
         "internvl", "instructblip", "minigpt4", "shikra")

WORDS = (
    "USER ASSISTANT : user assistant system what is in the image ? a an cat dog red blue green "
    "describe this . , there are two on of and with picture photo yes no table car tree sky man "
    "woman sitting standing left right near small large white black ball box"
).split()

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|image_pad|>", "<|vision_start|>",
            "<|vision_end|>", "<|im_start|>", "<|im_end|>", "<|video_pad|>"]

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(extra_words: tuple[str, ...] = (), extra_specials: tuple[str, ...] = (),
                    named_specials: dict[str, str] | None = None) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    # Extra specials go after the words, so the ids of the older families' vocabularies do not move.
    specials = [*SPECIALS, *extra_specials]
    for token in [*SPECIALS, *WORDS, *extra_words, *extra_specials]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        **({"extra_special_tokens": named_specials} if named_specials else {}),
    )


def _text_config(tokenizer: Any, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    params = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def _scale_weights(model: torch.nn.Module, scale: float, tokenizer: Any = None) -> None:
    """Random init gives near-uniform logits; larger weights give varied, non-degenerate generations.

    The output rows of special tokens other than EOS are zeroed: their logit is then 0 while the best word's is
    large, so a tiny model does not emit `<pad>` or `<image>` (which real checkpoints never do either).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(scale)
        if tokenizer is not None:
            head = model.get_output_embeddings().weight
            for token in SPECIALS:
                token_id = tokenizer.convert_tokens_to_ids(token)
                if token_id != tokenizer.eos_token_id:
                    head[token_id] = 0


def build_llava(seed: int = 0, image_size: int = 32, patch_size: int = 8, scale: float = 8.0,
                text: dict | None = None, vision: dict | None = None) -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer()
    vision_params = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=image_size, patch_size=patch_size)
    vision_params.update(vision or {})
    vision_config = CLIPVisionConfig(**vision_params)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_text_config(tokenizer, **(text or {})),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _scale_weights(model, scale, tokenizer)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return model, processor


def build_llava_next(seed: int = 0, scale: float = 8.0) -> tuple[Any, Any]:
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = build_tokenizer()
    image_size, patch_size = 32, 8
    vision_config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    _scale_weights(model, scale, tokenizer)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return model, processor


def build_qwen2_vl(seed: int = 0, scale: float = 8.0) -> tuple[Any, Any]:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2,
                         patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return _qwen_model(Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, text_config, vision_config,
                       ids, tokenizer, seed, scale)


def _qwen_model(config_cls: type, model_cls: type, processor_cls: type, text_config: Any, vision_config: Any,
                ids: dict[str, int], tokenizer: Any, seed: int, scale: float) -> tuple[Any, Any]:
    """The Qwen-VL families' shared tail: config with the vision special tokens, seeded weights, processor."""
    from transformers import Qwen2VLImageProcessorPil

    config = config_cls(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _scale_weights(model, scale, tokenizer)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
    )
    processor = image_only_qwen_processor(processor_cls)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=QWEN_TEMPLATE
    )
    return model, processor


def image_only_qwen_processor(base: type) -> type:
    """A Qwen2-VL/2.5-VL processor without a video processor.

    The stock processor insists on a video processor, whose base class needs torchvision; images alone do not.
    The subclass saves itself under the stock class name, so the saved directory loads with `AutoProcessor`
    wherever torchvision is installed (and through `vlmscope.load` everywhere).
    """

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if a != "video_processor"]

    # Saved configs name the class; the stock name keeps them loadable by the stock Auto classes.
    ImageOnlyProcessor.__name__ = base.__name__
    ImageOnlyProcessor.__qualname__ = base.__qualname__
    return ImageOnlyProcessor


def _seed_builders() -> dict[str, Any]:
    from vlmscope.models.tiny_seed import build_instructblip, build_minigpt4, build_shikra

    return {"instructblip": build_instructblip, "minigpt4": build_minigpt4, "shikra": build_shikra}


BUILDERS = {"llava": build_llava, "llava-next": build_llava_next, "qwen2-vl": build_qwen2_vl,
            "llava-onevision": lambda **kw: build_llava_onevision(**kw), "gemma3": lambda **kw: build_gemma3(**kw),
            "qwen3-vl": lambda **kw: build_qwen3_vl(**kw),
            "idefics3": lambda **kw: build_idefics3(**kw), "smolvlm": lambda **kw: build_smolvlm(**kw),
            "internvl": lambda **kw: build_internvl(**kw),
            **_seed_builders()}


def build_tiny(arch: str, seed: int = 0, **kwargs: Any) -> tuple[Any, Any]:
    from vlmscope.errors import InputError

    try:
        builder = BUILDERS[arch]
    except KeyError:
        raise InputError(f"unknown tiny architecture {arch!r}; choose one of: {', '.join(ARCHS)}") from None
    return builder(seed=seed, **kwargs)


def save_tiny(arch: str, out: str | Path, seed: int = 0) -> Path:
    """Write a tiny model with tokenizer and processor, loadable offline by stock Auto classes."""
    out = Path(out)
    model, processor = build_tiny(arch, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _write_video_processor_config(arch, processor, out)
    return out


# The stock video processor of each family whose stock processor has one. Those classes need torchvision, so
# the tiny processors are built without them (`image_only_qwen_processor`, `video_processor=None`); the saved
# directory still has to name one, or stock `AutoProcessor.from_pretrained` stops at "Can't load video
# processor" (on every transformers 5.x) before it even looks for torchvision.
VIDEO_PROCESSORS = {"qwen2-vl": "Qwen2VLVideoProcessor", "qwen3-vl": "Qwen3VLVideoProcessor",
                    "llava-onevision": "LlavaOnevisionVideoProcessor", "internvl": "InternVLVideoProcessor",
                    "smolvlm": "SmolVLMVideoProcessor"}
# Image-processor settings a family's video processor shares (same patching and normalisation, so a video
# frame is cut as an image would be); the image-only ones (tiling, padding, grid pinpoints) stay out.
_SHARED_WITH_VIDEO = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                      "resample", "rescale_factor", "size", "max_image_size", "patch_size", "merge_size",
                      "temporal_patch_size")


def _write_video_processor_config(arch: str, processor: Any, out: Path) -> None:
    """Nest a `video_processor` entry in processor_config.json, as stock `save_pretrained` does in 5.x.

    Written as JSON rather than by saving a video processor, because instantiating one needs torchvision.
    Where torchvision is installed, stock `AutoProcessor` then loads the directory; without it, it fails
    with transformers' own "requires torchvision" error, and `vlmscope.load` loads it either way.
    """
    class_name = VIDEO_PROCESSORS.get(arch)
    if class_name is None:
        return
    path = out / "processor_config.json"
    config = json.loads(path.read_text())
    if "video_processor" in config:  # a stock processor that saved its own
        return
    image = processor.image_processor.to_dict()
    video = {key: image[key] for key in _SHARED_WITH_VIDEO if key in image}
    video["video_processor_type"] = class_name
    config["video_processor"] = video
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _zero_special_rows(model: Any, tokenizer: Any, tokens: tuple[str, ...]) -> None:
    """As `_scale_weights` does for SPECIALS: the extra specials get logit 0, so greedy never picks them."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        for token in tokens:
            head[tokenizer.convert_tokens_to_ids(token)] = 0


def _siglip_vision(image_size: int, patch_size: int) -> Any:
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)


def build_llava_onevision(seed: int = 0, scale: float = 8.0,
                          vision_aspect_ratio: str = "anyres_max_4") -> tuple[Any, Any]:
    """LLaVA-OneVision: SigLIP tower (no CLS, "full" features), any-res tiles of 32 px, anyres_max_4 (a lower
    maximum makes the model shrink the tile grid, as real checkpoints do past 9 tiles)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    extra = ("<video>",)
    tokenizer = build_tokenizer(extra_specials=extra)
    image_size, patch_size = 32, 8
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
    config = LlavaOnevisionConfig(
        vision_config=_siglip_vision(image_size, patch_size),
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _scale_weights(model, scale, tokenizer)
    _zero_special_rows(model, tokenizer, extra)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints,
    )
    processor = image_only_qwen_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
        num_image_tokens=(image_size // patch_size) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio, chat_template=QWEN_TEMPLATE.replace(
            "<|vision_start|><|image_pad|><|vision_end|>", "<image>\n"),
    )
    return model, processor


GEMMA_TEMPLATE = (
    "<s>{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma3(seed: int = 0, scale: float = 8.0, layer_types: list[str] | None = None) -> tuple[Any, Any]:
    """Gemma 3: SigLIP tower, 4×4 patches pooled to 2×2 image tokens, layers 0, 1, 3 sliding, 2 full."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
    )

    extra = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>")
    tokenizer = build_tokenizer(("model",), extra_specials=extra, named_specials={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    # The tokenizer adds no BOS: the template writes it, as Gemma's does.
    tokenizer._tokenizer.post_processor = None
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in extra}
    image_size, patch_size, tokens_per_image = 32, 8, 4
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        query_pre_attn_scalar=16, sliding_window=8,
        layer_types=layer_types or ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=_siglip_vision(image_size, patch_size),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    _scale_weights(model, scale, tokenizer)
    _zero_special_rows(model, tokenizer, extra)
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA_TEMPLATE,
                                image_seq_length=tokens_per_image)
    return model, processor


def build_qwen3_vl(seed: int = 0, scale: float = 8.0) -> tuple[Any, Any]:
    """Qwen3-VL: 8-px patches merged 2×2 (one token per 16 px), M-RoPE, DeepStack features into layers 0 and 1."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "mrope_interleaved": True},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                         patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                         num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    return _qwen_model(Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, text_config, vision_config,
                       ids, tokenizer, seed, scale)


IDEFICS_TEMPLATE = (
    "<s>{% for message in messages %}{{ 'User' if message['role'] == 'user' else 'Assistant' }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_idefics3(seed: int = 0, scale: float = 8.0) -> tuple[Any, Any]:
    """Idefics3: 32-px tiles (row-major, up to 2×2 here) then a global view, each tile's 4×4 SigLIP patches
    pixel-shuffled (scale 2) into 2×2 tokens; `<row_i_col_j>` and `<global-img>` tags between tiles.
    (SmolVLM: `build_smolvlm`, same layout.)"""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    tags = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
    extra = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *tags)
    tokenizer = build_tokenizer(("User", "Assistant"), extra_specials=extra)
    tokenizer._tokenizer.post_processor = None  # the template writes BOS
    image_size, patch_size, scale_factor = 32, 8, 2
    vision_config = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    config = Idefics3Config(
        vision_config=vision_config.to_dict(),
        text_config=_text_config(tokenizer).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    _scale_weights(model, scale, tokenizer)
    _zero_special_rows(model, tokenizer, extra)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * image_size},
                                                max_image_size={"longest_edge": image_size}, do_image_splitting=True)
    seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                                  chat_template=IDEFICS_TEMPLATE)
    return model, processor


SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ 'User' if message['role'] == 'user' else 'Assistant' }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def image_only_smolvlm_processor() -> type:
    """SmolVLM's stock processor without its video processor (which needs torchvision).

    Besides dropping the attribute, `apply_chat_template` must not read `video_processor.num_frames`/`fps`,
    which the stock method forwards for videos even when a chat holds only images; the prompt text does not
    depend on them. Saved under the stock class name, like `image_only_qwen_processor`.
    """
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlySmolVLMProcessor(image_only_qwen_processor(SmolVLMProcessor)):  # type: ignore[misc]
        def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
            if getattr(self, "video_processor", None) is not None:
                return super().apply_chat_template(conversation, chat_template, **kwargs)
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    ImageOnlySmolVLMProcessor.__name__ = SmolVLMProcessor.__name__
    ImageOnlySmolVLMProcessor.__qualname__ = SmolVLMProcessor.__qualname__
    return ImageOnlySmolVLMProcessor


def build_smolvlm(seed: int = 0, scale: float = 8.0) -> tuple[Any, Any]:
    """SmolVLM: Idefics3's layout (32-px tiles row-major, up to 2×2 here, then a global view; each view's 4×4
    SigLIP patches pixel-shuffled, scale 2, into 2×2 tokens; `<row_i_col_j>` / `<global-img>` tags between)
    with SmolVLM's classes, `<|im_start|>User:` template and processor (which needs `num2words`)."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
        SmolVLMVisionConfig,
    )

    tags = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
    extra = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<video>", *tags)
    tokenizer = build_tokenizer(("User", "Assistant"), extra_specials=extra)
    tokenizer._tokenizer.post_processor = None  # SmolVLM's tokenizer adds no BOS; `<|im_start|>` opens the chat
    image_size, patch_size, scale_factor = 32, 8, 2
    vision_config = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    config = SmolVLMConfig(
        vision_config=vision_config.to_dict(),
        text_config=_text_config(tokenizer).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
    )
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    _scale_weights(model, scale, tokenizer)
    _zero_special_rows(model, tokenizer, extra)
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 2 * image_size},
                                               max_image_size={"longest_edge": image_size}, do_image_splitting=True)
    seq_len = (image_size // patch_size) ** 2 // scale_factor**2
    processor = image_only_smolvlm_processor()(image_processor=image_processor, tokenizer=tokenizer,
                                               video_processor=None, image_seq_len=seq_len,
                                               chat_template=SMOLVLM_TEMPLATE)
    return model, processor


def build_internvl(seed: int = 0, scale: float = 8.0) -> tuple[Any, Any]:
    """InternVL (HF port): 32-px tiles (1 to 4, closest aspect ratio) plus a thumbnail when tiled; each tile's
    4×4 patches pixel-shuffled (ratio 0.5) into 2×2 tokens between `<img>` and `</img>`."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
    )

    extra = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    tokenizer = build_tokenizer(extra_specials=extra, named_specials={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    image_size, patch_size = 32, 8
    vision_config = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=[image_size, image_size],
                                         patch_size=[patch_size, patch_size])
    config = InternVLConfig(
        vision_config=vision_config.to_dict(),
        text_config=_text_config(tokenizer).to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    _scale_weights(model, scale, tokenizer)
    _zero_special_rows(model, tokenizer, extra)
    image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    processor = image_only_qwen_processor(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_length=4,
        chat_template=QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n"))
    return model, processor
