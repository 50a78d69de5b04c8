"""Tiny random versions of the seeds' models besides LLaVA-1.5 (InstructBLIP, Shikra), stock classes only.

- InstructBLIP: `InstructBlipForConditionalGeneration` with a Llama language model (Vicuna in the real
  checkpoint), a tiny ViT, a Q-Former with `NUM_QUERY_TOKENS` queries, the word-level tokenizer for both the
  language model and the Q-Former. No chat template: like LAVIS (and OPERA's `<ImageHere><question>`), the
  language model reads `[queries] <s> question`.
- Shikra: `LlavaForConditionalGeneration` whose projector is one linear map (the second linear is the
  identity, the activation `linear`), image tokens `<im_start><im_patch>×N<im_end>` and Vicuna v1.1's
  conversation template, as `vlmscope convert shikra` writes real checkpoints.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vlmscope.models.tiny import _scale_weights, _text_config, build_tokenizer

NUM_QUERY_TOKENS = 8

SHIKRA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SHIKRA_IMAGE_TOKENS = ("<im_patch>", "<im_start>", "<im_end>")

# Vicuna v1.1 as Shikra's conversation code renders it: system, then "USER: ... ASSISTANT: ...</s>" turns
# separated by spaces; the image is `<im_start><im_patch>...<im_end>` before the question.
SHIKRA_TEMPLATE = (
    "{{ '" + SHIKRA_SYSTEM.replace("'", "\\'") + "' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: {% else %} ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<im_start><im_patch><im_end> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


MINIGPT4_WORDS = ("#", "<", ">", "/", "Img", "Human", "Assistant")


def minigpt4_template(num_query_tokens: int) -> str:
    """OPERA's MiniGPT-4 prompt, `###Human: <Img><ImageHere></Img> <question> ###Assistant:`, with the
    `<ImageHere>` slot written as one `<image>` per query (the stock BLIP-2 model fills them in place)."""
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}###Human: {% else %}###Assistant: {% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}<Img>" + "<image>" * num_query_tokens + "</Img> "
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %} "
        "{% endfor %}"
        "{% if add_generation_prompt %}###Assistant:{% endif %}"
    )


def build_minigpt4(seed: int = 0, image_size: int = 32, patch_size: int = 8, scale: float = 8.0,
                   num_query_tokens: int = NUM_QUERY_TOKENS) -> tuple[Any, Any]:
    """MiniGPT-4's architecture as a stock BLIP-2: ViT, Q-Former (queries only), one linear, LLaMA."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessorPil,
    )

    tokenizer = build_tokenizer(MINIGPT4_WORDS)
    vision_config = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    qformer_config = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, cross_attention_frequency=1)
    config = Blip2Config(
        vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(),
        text_config=_text_config(tokenizer).to_dict(), num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)
    _scale_weights(model, scale, tokenizer)
    # num_query_tokens=None: the processor leaves the image tokens where the chat template puts them.
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, num_query_tokens=None,
    )
    # The stock Blip2Processor drops a chat template on loading (its __init__ swallows the keyword), so the
    # template also goes with the tokenizer, which keeps it (`Blip2Adapter.render_prompt` reads either).
    processor.chat_template = tokenizer.chat_template = minigpt4_template(num_query_tokens)
    return model, processor


def build_instructblip(seed: int = 0, image_size: int = 32, patch_size: int = 8, scale: float = 8.0,
                       num_query_tokens: int = NUM_QUERY_TOKENS) -> tuple[Any, Any]:
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    tokenizer = build_tokenizer()
    qformer_tokenizer = build_tokenizer()
    vision_config = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    qformer_config = InstructBlipQFormerConfig(vocab_size=len(qformer_tokenizer), hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                               cross_attention_frequency=1, pad_token_id=qformer_tokenizer.pad_token_id)
    config = InstructBlipConfig(
        vision_config=vision_config.to_dict(), qformer_config=qformer_config.to_dict(),
        text_config=_text_config(tokenizer).to_dict(), num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Zero-initialised queries would make every query identical; real checkpoints have learnt ones.
        model.query_tokens.normal_(0.0, 1.0)
    _scale_weights(model, scale, tokenizer)
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer, num_query_tokens=num_query_tokens,
    )
    return model, processor


def build_shikra(seed: int = 0, image_size: int = 32, patch_size: int = 8, scale: float = 8.0) -> tuple[Any, Any]:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaForConditionalGeneration,
    )

    # The system prompt's words are in the vocabulary, so the tiny model reads the template as Shikra does.
    tokenizer = build_tokenizer(tuple(dict.fromkeys(re.findall(r"\w+|[^\w\s]", SHIKRA_SYSTEM))))
    tokenizer.add_tokens(list(SHIKRA_IMAGE_TOKENS), special_tokens=True)
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    config = shikra_llava_config(vision_config, _text_config(tokenizer),
                                 tokenizer.convert_tokens_to_ids("<im_patch>"), (image_size // patch_size) ** 2)
    config.shikra_pad_color = [255, 255, 255]  # Shikra's Expand2square colour (see models.convert.shikra)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _scale_weights(model, scale, tokenizer)
    with torch.no_grad():
        for token in SHIKRA_IMAGE_TOKENS:
            model.get_output_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = 0
        set_identity_second_linear(model)
    processor = shikra_processor(
        CLIPImageProcessorPil(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size}),
        tokenizer, patch_size,
    )
    return model, processor


def shikra_llava_config(vision_config: Any, text_config: Any, image_token_id: int, image_seq_length: int) -> Any:
    """Shikra as a stock LLaVA config: features of the penultimate CLIP layer without CLS, one linear map."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        image_seq_length=image_seq_length, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="linear",
    )


def set_identity_second_linear(model: Any) -> None:
    """LLaVA's projector is linear_2(act(linear_1(x))); with act = identity and linear_2 = I it is linear_1."""
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        projector.linear_2.weight.copy_(torch.eye(projector.linear_2.weight.shape[0]))
        projector.linear_2.bias.zero_()


def shikra_processor(image_processor: Any, tokenizer: Any, patch_size: int) -> Any:
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<im_patch>", chat_template=SHIKRA_TEMPLATE)
