"""Causal tools against manual computations with the same edit.

- logit lens: the stock model's `output_hidden_states` pushed through its final norm and unembedding by hand,
  and at the last layer the stock logits themselves;
- head ablation: the same head removed by editing `o_proj`'s weights (zero ablation: its columns zeroed;
  mean ablation: columns zeroed plus a bias equal to the head's mean contribution), scored by a stock forward;
- activation patching: the decoder layers run one by one by hand from the mixed residual stream.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmscope
from vlmscope.cli import main as cli_main
from vlmscope.errors import InputError
from vlmscope.explain.causal import (
    AblationResult,
    LensResult,
    PatchResult,
    ablate_heads,
    answer_logprob,
    logit_lens,
    patch_activations,
)
from vlmscope.explain.flow import build_inputs

PROMPT = "what is in the image ?"


def picture(seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(40, 56, 3) * 255).astype("uint8"))


def stock_forward(vlm, inputs, **kwargs):
    batch = inputs.batch
    with torch.no_grad():
        return vlm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=inputs.positions, **batch.model_inputs, use_cache=False, return_dict=True,
                         **kwargs)


def logprob_of(logits: torch.Tensor, inputs) -> float:
    """Σ log p(answer token) from full-sequence logits [T, V]."""
    n, p = len(inputs.answer_ids), inputs.prompt_len
    logp = torch.log_softmax(logits[p - 1:p - 1 + n].double(), dim=-1)
    return float(logp[torch.arange(n), torch.tensor(inputs.answer_ids)].sum())


def grid_positions(inputs) -> np.ndarray:
    return inputs.image_span[0] + inputs.grids[0].indices().ravel()


# --- logit lens ---------------------------------------------------------------------------------------------
def test_logit_lens_equals_hidden_states_through_norm_and_unembedding(tiny_llava) -> None:
    vlm, image = tiny_llava, picture(0)
    lens = logit_lens(vlm, image, PROMPT, word="dog", top_k=3)
    inputs = build_inputs(vlm, vlm.encode([image], [PROMPT]), [])
    out = stock_forward(vlm, inputs, output_hidden_states=True)
    positions = grid_positions(inputs)
    decoder, unembed = vlm.model.get_decoder(), vlm.model.get_output_embeddings()
    dog = vlm.adapter.tokenizer(" dog", add_special_tokens=False)["input_ids"]
    dog = [i for i in dog if vlm.adapter.tokenizer.decode([i]).strip()][0]
    assert lens.word_token_id == dog
    n_layers = vlm.adapter.num_layers
    for li, layer in enumerate(lens.layers):
        with torch.no_grad():
            if layer < n_layers - 1:  # hidden_states[l + 1]: the residual stream leaving layer l
                probs = torch.softmax(unembed(decoder.norm(out.hidden_states[layer + 1][0, positions])).double(), -1)
            else:  # the last layer's lens is the model's own prediction at the image tokens
                probs = torch.softmax(out.logits[0, positions].double(), -1)
        values, ids = probs.topk(3, dim=-1)
        shape = (lens.grid.height, lens.grid.width)
        np.testing.assert_allclose(lens.top_probs[li], values.numpy().reshape(*shape, 3), rtol=1e-5, atol=1e-7)
        assert (lens.top_ids[li] == ids.numpy().reshape(*shape, 3)).all()
        np.testing.assert_allclose(lens.word_probs[li], probs[:, dog].numpy().reshape(shape), rtol=1e-5)
    assert lens.top_tokens(0, 0, 0)[0][0] == vlm.adapter.tokenizer.decode([int(lens.top_ids[0, 0, 0, 0])])


def test_lens_saves_and_loads(tiny_llava, tmp_path) -> None:
    lens = logit_lens(tiny_llava, picture(0), PROMPT, word="cat", layers="1,3")
    lens.save(tmp_path / "lens")
    back = vlmscope.load_result(tmp_path / "lens")
    assert isinstance(back, LensResult) and back.layers == [1, 3]
    np.testing.assert_array_equal(back.word_probs, lens.word_probs)
    record = json.loads((tmp_path / "lens" / "run.json").read_text())
    assert record["kind"] == "lens" and record["provenance"]["model"] == "tiny-llava"


# --- head ablation ------------------------------------------------------------------------------------------
def _weight_edited_logprob(vlm, inputs, pairs, mode, clean_inputs) -> float:
    """Answer log-probability with the heads removed through o_proj's weights (fresh model, edited in place)."""
    size = vlm.model.config.text_config.hidden_size // vlm.adapter.num_heads
    layers = vlm.adapter.decoder_layers()
    means = {}
    if mode == "mean":  # the head's mean input to o_proj over the positions, from the unedited forward
        kept = {}
        handles = [layers[layer].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: kept.__setitem__(layer, a[0][0].detach().clone())) for layer, _ in pairs]
        stock_forward(vlm, clean_inputs)
        for handle in handles:
            handle.remove()
        means = {(layer, head): kept[layer][:, head * size:(head + 1) * size].mean(0) for layer, head in pairs}
    with torch.no_grad():
        for layer, head in pairs:
            proj = layers[layer].self_attn.o_proj
            columns = proj.weight[:, head * size:(head + 1) * size]
            if mode == "mean":
                bias = columns @ means[(layer, head)]
                proj.bias = torch.nn.Parameter(bias if proj.bias is None else proj.bias + bias)
            columns.zero_()
    return logprob_of(stock_forward(vlm, inputs).logits[0], inputs)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_ablation_equals_o_proj_weight_edit(tiny_vlm, mode) -> None:
    image = picture(1)
    result = ablate_heads(tiny_vlm("llava"), image, PROMPT, heads="0,2", layers="1,2", mode=mode,
                          max_new_tokens=4)
    assert result.heads == [[1, 0], [1, 2], [2, 0], [2, 2]]
    for pairs, effect in [([pair], e) for pair, e in zip(result.heads, result.effects)] + \
                         [(result.heads, result.joint_effect)]:
        vlm = tiny_vlm("llava")  # a fresh copy per edit (same seed: the same weights)
        inputs = build_inputs(vlm, vlm.encode([image], [PROMPT]), result.answer_ids)
        base = logprob_of(stock_forward(vlm, inputs).logits[0], inputs)
        assert base == pytest.approx(result.logprob, abs=1e-9)
        edited = _weight_edited_logprob(vlm, inputs, pairs, mode, inputs)
        assert effect == pytest.approx(edited - base, abs=1e-4), pairs
    assert abs(result.joint_effect) > 1e-3  # the edit does something: the check above could fail
    assert [float(result.effects[i]) for i in result.ranking] == sorted(result.effects.tolist())


def test_ablation_hooks_are_removed_also_on_error(tiny_llava) -> None:
    from vlmscope.explain.causal import ablated

    layer = tiny_llava.adapter.decoder_layers()[1].self_attn.o_proj
    with pytest.raises(RuntimeError), ablated(tiny_llava, [(1, 0)]):
        assert layer._forward_pre_hooks
        raise RuntimeError("boom")
    assert not layer._forward_pre_hooks
    with pytest.raises(InputError, match="head 9 is out of range"):
        ablate_heads(tiny_llava, picture(0), PROMPT, heads=[(0, 9)])


# --- activation patching ------------------------------------------------------------------------------------
def manual_patched_logprob(vlm, clean, corrupt, layer: int, positions: np.ndarray) -> float:
    """Mix the residual streams entering `layer`, then run layers layer.. by hand and unembed."""
    hidden_clean = stock_forward(vlm, clean, output_hidden_states=True).hidden_states[layer][0]
    hidden = stock_forward(vlm, corrupt, output_hidden_states=True).hidden_states[layer].clone()
    hidden[0, torch.as_tensor(positions)] = hidden_clean[torch.as_tensor(positions)]
    decoder = vlm.model.get_decoder()
    length = hidden.shape[1]
    mask = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    with torch.no_grad():
        rotary = decoder.rotary_emb(hidden, corrupt.positions)
        for block in decoder.layers[layer:]:
            out = block(hidden, attention_mask=mask, position_ids=corrupt.positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = vlm.model.get_output_embeddings()(decoder.norm(hidden))
    return logprob_of(logits[0], corrupt)


def test_patching_equals_manual_forward_with_the_same_edit(tiny_llava) -> None:
    vlm, clean_image, corrupt_image = tiny_llava, picture(2), picture(3)
    result = patch_activations(vlm, clean_image, corrupt_image, PROMPT, positions="each", max_new_tokens=4)
    clean = build_inputs(vlm, vlm.encode([clean_image], [PROMPT]), result.answer_ids)
    corrupt = build_inputs(vlm, vlm.encode([corrupt_image], [PROMPT]), result.answer_ids)
    assert result.logprob_clean == pytest.approx(answer_logprob(vlm, clean), abs=1e-9)
    assert result.logprob_corrupt == pytest.approx(answer_logprob(vlm, corrupt), abs=1e-9)
    assert abs(result.logprob_clean - result.logprob_corrupt) > 1e-2  # the images make a difference
    span = np.arange(*clean.image_span)
    for li in (1, 2):
        want = manual_patched_logprob(vlm, clean, corrupt, result.layers[li], span)
        assert result.layer_logprob[li] == pytest.approx(want, abs=1e-4)
    cells = grid_positions(clean)
    for li, k in ((1, 5), (3, 10)):
        want = manual_patched_logprob(vlm, clean, corrupt, result.layers[li], cells[k:k + 1])
        assert result.position_logprob[li].flat[k] == pytest.approx(want, abs=1e-4)
    # Layer 0 at every image token: the text tokens are the same, so the clean run is restored exactly.
    assert result.layer_restoration[0] == pytest.approx(1.0, abs=1e-9)
    gap = result.logprob_clean - result.logprob_corrupt
    np.testing.assert_allclose(result.layer_restoration, (result.layer_logprob - result.logprob_corrupt) / gap)
    assert result.position_restoration.shape == (4, result.grid.height, result.grid.width)


def test_patch_refuses_images_of_another_token_count(tiny_qwen2_vl) -> None:
    with pytest.raises(InputError, match="another number of image tokens"):
        patch_activations(tiny_qwen2_vl, picture(0), Image.new("RGB", (120, 90)), PROMPT, max_new_tokens=2)


# --- CLI ----------------------------------------------------------------------------------------------------
def test_cli_lens_ablate_patch(tmp_path, capsys) -> None:
    clean, corrupt = tmp_path / "clean.png", tmp_path / "corrupt.png"
    picture(2).save(clean)
    picture(3).save(corrupt)
    model = ["--model", "tiny-llava", "--prompt", PROMPT]
    assert cli_main(["lens", *model, "--image", str(clean), "--word", "dog", "--out", str(tmp_path / "l"),
                     "--json"]) == 0
    lens = json.loads(capsys.readouterr().out)
    assert lens["layers"] == [0, 1, 2, 3] and isinstance(vlmscope.load_result(tmp_path / "l"), LensResult)
    assert cli_main(["ablate", *model, "--image", str(clean), "--layers", "1", "--answer", "a box",
                     "--out", str(tmp_path / "a"), "--json"]) == 0
    ablation = json.loads(capsys.readouterr().out)
    saved = vlmscope.load_result(tmp_path / "a")
    assert isinstance(saved, AblationResult) and saved.answer == "a box" and len(saved.heads) == 4
    assert ablation["top"][0][:2] == saved.heads[saved.ranking[0]]
    assert cli_main(["patch", *model, "--image", str(clean), "--corrupt-image", str(corrupt),
                     "--max-new-tokens", "3", "--out", str(tmp_path / "p"), "--json"]) == 0
    patch = json.loads(capsys.readouterr().out)
    saved = vlmscope.load_result(tmp_path / "p")
    assert isinstance(saved, PatchResult)
    assert patch["layer_restoration"] == pytest.approx(saved.layer_restoration.tolist())


# --- other families -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llava-next", "qwen2-vl"])
def test_causal_tools_on_other_families(tiny_vlm, arch) -> None:
    vlm, image = tiny_vlm(arch), picture(4)
    last = vlm.adapter.num_layers - 1
    lens = logit_lens(vlm, image, PROMPT, layers=[last], top_k=2)
    inputs = build_inputs(vlm, vlm.encode([image], [PROMPT]), [])
    probs = torch.softmax(stock_forward(vlm, inputs).logits[0, grid_positions(inputs)].double(), -1)
    np.testing.assert_allclose(lens.top_probs[0].reshape(-1, 2), probs.topk(2, dim=-1).values.numpy(), rtol=1e-5)

    result = ablate_heads(vlm, image, PROMPT, heads=[(1, 1)], max_new_tokens=3)
    inputs = build_inputs(vlm, vlm.encode([image], [PROMPT]), result.answer_ids)
    base = logprob_of(stock_forward(vlm, inputs).logits[0], inputs)
    edited = _weight_edited_logprob(vlm, inputs, [(1, 1)], "zero", inputs)
    assert result.effects[0] == pytest.approx(edited - base, abs=1e-4)

    patch = patch_activations(vlm, image, picture(5), PROMPT, layers="0", max_new_tokens=3)
    assert patch.layer_restoration[0] == pytest.approx(1.0, abs=1e-6)
