"""Tiny random vision-language models built offline (tests, CI, `vlmscope tiny-model`).

Each model uses the stock transformers classes of its family, a word-level tokenizer over a small vocabulary,
the family's PIL image processor (torchvision is not required) and a chat template that places the image the
way the real checkpoints do. Weight matrices are scaled up after the random init so greedy generations vary
instead of repeating one token, which makes equivalence tests between decoding paths meaningful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llava", "llava-next", "qwen2-vl", "instructblip", "minigpt4", "shikra")

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


def build_tokenizer(extra_words: tuple[str, ...] = ()) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *WORDS, *extra_words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.add_special_tokens(SPECIALS)
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
        Qwen2VLImageProcessorPil,
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
    config = Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    _scale_weights(model, scale, tokenizer)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},
    )
    processor = image_only_qwen_processor(Qwen2VLProcessor)(
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


BUILDERS = {"llava": build_llava, "llava-next": build_llava_next, "qwen2-vl": build_qwen2_vl, **_seed_builders()}


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
    return out
