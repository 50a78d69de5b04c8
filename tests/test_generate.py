"""Our decoding loop against stock transformers `generate` (the oracle), on every supported family."""

from __future__ import annotations

import pytest
import torch

import vlmscope
from vlmscope.errors import InputError, UnsupportedModelError

PROMPTS = ["describe this image .", "what is in the image ?"]


def stock_generate(vlm, image, prompt, **kwargs):
    text = vlm.adapter.render_prompt(prompt)
    inputs = vlm.processor(images=[image], text=[text], return_tensors="pt")
    out = vlm.model.generate(**inputs, do_sample=False, return_dict_in_generate=True, output_scores=True,
                             **kwargs)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return new, out


def strip_pad(tokens, pad_id):
    while tokens and tokens[-1] == pad_id:
        tokens = tokens[:-1]
    return tokens


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"])
def vlm(request):
    return vlmscope.load(request.param, device="cpu")


def test_greedy_matches_stock_generate(vlm, images):
    for image, prompt in zip(images, PROMPTS):
        result = vlm.generate(image, prompt, max_new_tokens=12)
        ref, out = stock_generate(vlm, image, prompt, max_new_tokens=12)
        assert result.token_ids == strip_pad(ref, vlm.adapter.tokenizer.pad_token_id)
        # Scores: log-softmax of stock's per-step logits at the chosen token.
        ref_scores = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ref)]
        assert result.scores == pytest.approx(ref_scores[: len(result.scores)], abs=1e-4)


def test_greedy_is_not_degenerate(vlm, images):
    result = vlm.generate(images[0], PROMPTS[0], max_new_tokens=12)
    assert len(set(result.token_ids)) > 1


def test_beam_matches_stock_beam_search(vlm, images):
    for image, prompt in zip(images, PROMPTS):
        result = vlm.generate(image, prompt, max_new_tokens=10, decoding="beam:num_beams=3")
        ref, out = stock_generate(vlm, image, prompt, max_new_tokens=10, num_beams=3)
        assert result.token_ids == strip_pad(ref, vlm.adapter.tokenizer.pad_token_id)
        assert result.sequence_score == pytest.approx(out.sequences_scores[0].item(), abs=1e-4)


def test_batch_equals_each_alone(vlm, images):
    batch = vlm.generate(images, PROMPTS, max_new_tokens=8)
    alone = [vlm.generate(im, p, max_new_tokens=8) for im, p in zip(images, PROMPTS)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    for a, b in zip(batch, alone):
        assert a.scores == pytest.approx(b.scores, abs=1e-4)
        assert a.prompt_ids == b.prompt_ids


def test_beam_batch_equals_each_alone(tiny_llava, images):
    batch = tiny_llava.generate(images, PROMPTS, max_new_tokens=8, decoding={"name": "beam", "num_beams": 2})
    alone = [tiny_llava.generate(im, p, max_new_tokens=8, decoding="beam:num_beams=2")
             for im, p in zip(images, PROMPTS)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]


def test_eos_ends_generation(tiny_llava, images):
    """Force EOS as the most likely token: generation stops after it, as stock generate does."""
    eos = tiny_llava.adapter.tokenizer.eos_token_id
    head = tiny_llava.model.get_output_embeddings().weight
    baseline = tiny_llava.generate(images[0], PROMPTS[0], max_new_tokens=6)
    saved = head[eos].clone()
    try:
        with torch.no_grad():
            # EOS now scores 1.5x the baseline's second token: it wins by step 1 at the latest.
            head[eos] = 1.5 * head[baseline.token_ids[1]]
        result = tiny_llava.generate(images[0], PROMPTS[0], max_new_tokens=6)
        ref, _ = stock_generate(tiny_llava, images[0], PROMPTS[0], max_new_tokens=6)
    finally:
        with torch.no_grad():
            head[eos] = saved
    assert result.token_ids[-1] == eos and len(result.token_ids) <= 2
    assert result.token_ids == strip_pad(ref, tiny_llava.adapter.tokenizer.pad_token_id)


def test_result_fields(tiny_llava, images):
    result = tiny_llava.generate(images[0], PROMPTS[0], max_new_tokens=5)
    assert result.image_tokens == 16
    assert len(result.scores) == len(result.token_ids)
    assert result.prompt_ids[0] == tiny_llava.adapter.tokenizer.bos_token_id
    assert result.text == tiny_llava.adapter.tokenizer.decode(result.token_ids, skip_special_tokens=True).strip()


def test_sampling_is_seeded(tiny_llava, images):
    a = tiny_llava.generate(images[0], PROMPTS[0], max_new_tokens=8, decoding="sample:seed=3,temperature=2")
    b = tiny_llava.generate(images[0], PROMPTS[0], max_new_tokens=8, decoding="sample:seed=3,temperature=2")
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "empty prompt"),
        (dict(image=None), "no image"),
        (dict(image="/nonexistent/image.png"), "not found"),
        (dict(decoding="beam:num_beam=2"), "no parameter"),
        (dict(decoding="nucleus"), "unknown decoding"),
        (dict(interventions="nothing-like-this"), "unknown intervention"),
    ],
)
def test_bad_input_errors(tiny_llava, images, kwargs, message):
    args = dict(image=images[0], prompt="describe this image .")
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        tiny_llava.generate(args.pop("image"), args.pop("prompt"), max_new_tokens=2, **args)


def test_corrupt_image(tiny_llava, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="corrupt"):
        tiny_llava.generate(str(bad), "describe this image .", max_new_tokens=2)


def test_unsupported_model_lists_families(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="llava"):
        vlmscope.load(str(tmp_path))


def test_layer_and_head_range_checks(tiny_llava):
    assert tiny_llava.adapter.check_layer(-1) == 3
    with pytest.raises(InputError, match="0..3"):
        tiny_llava.adapter.check_layer(4)
    with pytest.raises(InputError, match="0..3"):
        tiny_llava.adapter.check_head(7)


# --- inputs are not mutated, options are real, one spec serves several runs -----------------------------------


def test_encode_leaves_the_tokenizer_padding_side_alone(tiny_llava, images):
    tokenizer = tiny_llava.adapter.tokenizer
    before = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        batch = tiny_llava.encode(images, PROMPTS)
        assert tokenizer.padding_side == "right"
        short = int(batch.attention_mask.sum(dim=1).argmin())
        assert batch.attention_mask[short, 0] == 0 and bool(batch.attention_mask[:, -1].all())  # left-padded
        tiny_llava.generate(images, PROMPTS, max_new_tokens=2, interventions="pai:cfg=true,gamma=2")  # text-only too
        assert tokenizer.padding_side == "right"
    finally:
        tokenizer.padding_side = before


def test_load_forwards_attn_implementation(images, tmp_path):
    from vlmscope.models.tiny import save_tiny

    for ref in ("tiny-llava", str(save_tiny("llava", tmp_path / "saved"))):
        vlm = vlmscope.load(ref, device="cpu", attn_implementation="eager")
        assert vlm.model.config.text_config._attn_implementation == "eager"
        assert vlm.model.config.vision_config._attn_implementation == "eager"
        result = vlm.generate(images[0], PROMPTS[0], max_new_tokens=6, interventions="pai:alpha=0")
        ref_tokens, _ = stock_generate(vlm, images[0], PROMPTS[0], max_new_tokens=6)
        assert result.token_ids == strip_pad(ref_tokens, vlm.adapter.tokenizer.pad_token_id)
        assert vlm.model.config.text_config._attn_implementation == "eager"  # restored after the run
    with pytest.raises(InputError, match="attn_implementation='no-such-kernel'"):
        vlmscope.load("tiny-llava", device="cpu", attn_implementation="no-such-kernel")


@pytest.mark.parametrize("options, message", [
    (dict(revision="main"), "revision cannot be used with the built-in model"),
    (dict(device_map="auto"), "either device or device_map"),
    (dict(quantization_config={"load_in_8bit": True}), "quantization_config cannot be used"),
    (dict(num_beams=3), "unknown option"),
])
def test_load_options_errors(options, message):
    with pytest.raises(InputError, match=message):
        vlmscope.load("tiny-llava", device="cpu", **options)


def test_one_decoding_spec_serves_two_runs(tiny_llava, images):
    """Sampling keeps its random generator in the run, not on the spec: the same instance twice samples the
    same tokens, as two fresh instances do."""
    from vlmscope.decoding import DECODINGS

    method = DECODINGS.parse("sample:seed=3,temperature=2")
    first = tiny_llava.generate(images[0], PROMPTS[0], max_new_tokens=8, decoding=method).token_ids
    second = tiny_llava.generate(images[0], PROMPTS[0], max_new_tokens=8, decoding=method).token_ids
    fresh = tiny_llava.generate(images[0], PROMPTS[0], max_new_tokens=8, decoding="sample:seed=3,temperature=2")
    assert first == second == fresh.token_ids
    for name in DECODINGS.names():
        assert DECODINGS.get(name).__dataclass_params__.frozen, name


def test_eos_and_pad_come_from_the_adapter(tiny_llava):
    from vlmscope.models.adapters import TextAdapter

    adapter = tiny_llava.adapter
    assert adapter.eos_token_ids() == [tiny_llava.model.generation_config.eos_token_id]
    assert adapter.pad_token_id() == adapter.tokenizer.pad_token_id

    class Bare:
        generation_config = None

    text = TextAdapter.__new__(TextAdapter)
    text.model, text.tokenizer = Bare(), None
    assert text.eos_token_ids() == [] and text.pad_token_id() == 0
    Bare.generation_config = type("G", (), {"eos_token_id": [5, 7, 5], "pad_token_id": None})()
    assert text.eos_token_ids() == [5, 7] and text.pad_token_id() == 5


def test_load_refuses_an_unusable_device_in_one_line():
    import pytest
    import torch

    import vlmscope
    from vlmscope.errors import InputError

    with pytest.raises(InputError, match="unknown device"):
        vlmscope.load("tiny-llava", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="sees no CUDA GPU"):
            vlmscope.load("tiny-llava", device="cuda")
