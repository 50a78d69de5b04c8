"""Construction of the shapes model's tokenizer, processor and configuration (stock transformers classes).

The model is a stock LLaVA: a small CLIP-style ViT, the LLaVA two-layer projector and a small Llama
decoder. Image tokens stay a spatial grid (8 x 8 patches of a 64 x 64 image, no pooling), so attention
to the image can be read as a map.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmscope.shapes.vocab import BOS, EOS, IMAGE, PAD, SPECIAL_TOKENS, UNK, vocabulary
from vlmscope.shapes.world import DEFAULT_WORLD

# The LLaVA-1.5 conversation format, "USER: <image>\n{text} ASSISTANT: {answer}</s>", written for
# `apply_chat_template`. Content may be a list of {"type": "image"|"text"} parts or a plain string; images
# always come first in a user turn, as in LLaVA-1.5. An assistant turn ends with EOS so a rendered
# conversation can be used for teacher forcing.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] + ' ' }}{%- endfor -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' }}"
    "{%- for p in parts if p['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] + ' ' }}{%- endfor -%}"
    "{%- else -%}"
    "{{ 'ASSISTANT: ' }}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}"
    "{{ '</s>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ModelSize:
    """Architecture sizes. The defaults are the shipped model's."""

    image_size: int = DEFAULT_WORLD.image_size
    patch_size: int = 8
    vision_hidden: int = 128
    vision_intermediate: int = 384
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 192
    text_intermediate: int = 512
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    max_positions: int = 256

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid


DEFAULT_SIZE = ModelSize()


def build_tokenizer():
    """A word-level fast tokenizer over the world's vocabulary (lowercasing, punctuation split off)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    # Split on whitespace, then isolate every punctuation character: "image?" -> "image", "?".
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    # Specials are matched before normalisation; "<image>" must be special or the processor's expansion of
    # one "<image>" into a run of image tokens would be split into "<", "image", ">".
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        extra_special_tokens={"image_token": IMAGE},
        clean_up_tokenization_spaces=False,
    )
    return tok


def build_processor(tokenizer=None, size: ModelSize = DEFAULT_SIZE):
    """LlavaProcessor with the PIL CLIP image processor (torchvision-free) and the LLaVA-1.5 chat template."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer=None, size: ModelSize = DEFAULT_SIZE):
    """The LlavaConfig of the shapes model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    n_vocab = len(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        num_channels=3,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        max_position_embeddings=size.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=size.num_image_tokens,
        # LLaVA-1.5 reads layer -2; a 3-layer tower from scratch needs all its layers (the last one would be
        # computed and never used).
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_generation_config(tokenizer=None):
    """Greedy decoding with a budget that fits the longest caption, so stock `generate()` needs no arguments."""
    from transformers import GenerationConfig

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )


def build_model(seed: int = 0, size: ModelSize = DEFAULT_SIZE):
    """A freshly initialised (untrained) shapes model, with its processor."""
    import torch
    from transformers import LlavaForConditionalGeneration

    processor = build_processor(size=size)
    config = build_config(processor.tokenizer, size=size)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = build_generation_config(processor.tokenizer)
    return model, processor
