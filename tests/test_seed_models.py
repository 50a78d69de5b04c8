"""The seeds' other models: InstructBLIP (Q-Former queries as the image span) and Shikra (LLaVA, one linear).

Oracles: the stock processor and stock `generate`, stock eager attentions (language model and Q-Former
cross-attention) for the explain carry, hand computations.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlmscope.errors import InputError

PROMPT = "what is in the image ?"


@pytest.fixture(scope="module")
def tiny_instructblip():
    import vlmscope

    return vlmscope.load("tiny-instructblip")


@pytest.fixture(scope="module")
def tiny_shikra():
    import vlmscope

    return vlmscope.load("tiny-shikra")


def _stock_inputs(vlm, image, prompt):
    return vlm.processor(images=[image], text=[prompt], return_tensors="pt")


def test_instructblip_encode_matches_stock_processor(tiny_instructblip, images):
    vlm = tiny_instructblip
    batch = vlm.encode([images[0]], [PROMPT])
    stock = _stock_inputs(vlm, images[0], PROMPT)
    assert torch.equal(batch.input_ids, stock["input_ids"])
    assert torch.equal(batch.attention_mask, stock["attention_mask"])
    for key in ("pixel_values", "qformer_input_ids", "qformer_attention_mask"):
        assert torch.equal(batch.model_inputs[key], stock[key]), key
    q = vlm.model.config.num_query_tokens
    # The image span is the query tokens, first in the sequence (before <s>), as LAVIS and OPERA place them.
    assert batch.image_mask[0].nonzero().flatten().tolist() == list(range(q))
    assert vlm.adapter.image_grids(batch, 0)[0].width == q


def test_instructblip_batch_is_left_padded_and_equals_single_rows(tiny_instructblip, images):
    vlm = tiny_instructblip
    prompts = [PROMPT, "describe this picture of a red ball on the table ."]
    batch = vlm.encode(images, prompts)
    q = vlm.model.config.num_query_tokens
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        alone = vlm.encode([image], [prompt])
        n = alone.input_ids.shape[1]
        assert torch.equal(batch.input_ids[row, -n:], alone.input_ids[0])
        assert int(batch.attention_mask[row].sum()) == n  # pads only on the left, then queries, then text
        assert int(batch.image_mask[row].sum()) == q
    together = vlm.generate(images, prompts, max_new_tokens=5)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        assert together[row].token_ids == vlm.generate(image, prompt, max_new_tokens=5).token_ids


@pytest.mark.parametrize("num_beams", [1, 3])
def test_instructblip_generate_equals_stock(tiny_instructblip, images, num_beams):
    vlm = tiny_instructblip
    stock_inputs = _stock_inputs(vlm, images[1], PROMPT)
    with torch.no_grad():
        stock = vlm.model.generate(**stock_inputs, max_new_tokens=6, do_sample=False, num_beams=num_beams)
    decoding = "greedy" if num_beams == 1 else f"beam:num_beams={num_beams}"
    ours = vlm.generate(images[1], PROMPT, max_new_tokens=6, decoding=decoding)
    # Stock InstructBLIP generate returns the prompt too ([queries, <s>, ...]); drop it and any EOS padding.
    tail = stock[0, stock_inputs["input_ids"].shape[1]:].tolist()
    assert ours.token_ids == tail[: len(ours.token_ids)] and len(ours.token_ids) >= 1


def test_instructblip_opera_and_pai_act_on_the_queries(tiny_instructblip, images):
    vlm = tiny_instructblip
    beam = vlm.generate(images[0], PROMPT, max_new_tokens=6, decoding="beam:num_beams=3")
    # Neutral OPERA (no penalty, no rollback, scored over the whole vocabulary) is stock beam search.
    neutral = "opera:num_beams=3,penalty_weights=0.0,threshold=1000,renormalize_candidates=false"
    assert vlm.generate(images[0], PROMPT, max_new_tokens=6, decoding=neutral).token_ids == beam.token_ids
    # With the penalty, the columns it reads are the queries' (the run's image mask) and it changes the search.
    penalised = vlm.generate(images[0], PROMPT, max_new_tokens=6,
                             decoding="opera:num_beams=3,penalty_weights=50.0,renormalize_candidates=false")
    assert penalised.token_ids != beam.token_ids
    greedy = vlm.generate(images[0], PROMPT, max_new_tokens=4)
    pai = vlm.generate(images[0], PROMPT, max_new_tokens=4, interventions=["pai:alpha=2.0,start=0,end=4"])
    none = vlm.generate(images[0], PROMPT, max_new_tokens=4, interventions=["pai:alpha=0.0,start=0,end=4"])
    assert none.scores == pytest.approx(greedy.scores, abs=1e-5)
    assert not np.allclose(pai.scores[:1], greedy.scores[:1], atol=1e-4)  # the query columns were amplified


@pytest.mark.parametrize("arch", ["instructblip", "minigpt4"])
def test_qformer_methods_that_need_patches(arch, request, images, tmp_path):
    from vlmscope.errors import UnsupportedModelError

    vlm = request.getfixturevalue(f"tiny_{arch}")
    greedy = vlm.generate(images[0], PROMPT, max_new_tokens=3)
    # FastV and truncation work on the queries (the image tokens of the language model's sequence): with
    # nothing dropped or masked they are greedy, with everything masked from layer 1 on they are not.
    kept = vlm.generate(images[0], PROMPT, max_new_tokens=3, interventions=["fastv:k=1,ratio=0.0"])
    assert kept.scores == pytest.approx(greedy.scores, abs=1e-4)
    dropped = vlm.generate(images[0], PROMPT, max_new_tokens=3, interventions=["fastv:k=1,ratio=1.0"])
    assert dropped.scores != pytest.approx(greedy.scores, abs=1e-4)
    masked = vlm.generate(images[0], PROMPT, max_new_tokens=3, interventions=["truncate:layer=1"])
    assert masked.scores != pytest.approx(greedy.scores, abs=1e-4)
    codebook = tmp_path / "codebook.pt"
    torch.save(torch.randn(4, 32), codebook)
    with pytest.raises(UnsupportedModelError):  # needs patch tokens in the sequence
        vlm.generate(images[0], PROMPT, max_new_tokens=3, interventions=[f"codebook:path={codebook},keep_ratio=0.5"])
    with pytest.raises(InputError):  # no vision reference map for a Q-Former model
        vlm.generate(images[0], PROMPT, max_new_tokens=3, interventions=["aai"])
    assert vlm.generate(images[0], PROMPT, max_new_tokens=3, interventions=["aai:reference=uniform"]).token_ids


def test_carry_queries_to_patches_by_hand():
    from vlmscope.explain.maps import carry_queries_to_patches

    query_maps = np.array([[0.2, 0.6]])  # one step: attention to query 0 and query 1
    query_patch = np.array([[0.5, 0.25, 0.25, 0.0], [0.0, 0.1, 0.3, 0.4]])  # rows: queries (CLS left out)
    expected = [[0.2 * 0.5, 0.2 * 0.25 + 0.6 * 0.1, 0.2 * 0.25 + 0.6 * 0.3, 0.6 * 0.4]]
    assert carry_queries_to_patches(query_maps, query_patch) == pytest.approx(np.array(expected))
    with pytest.raises(InputError):
        carry_queries_to_patches(query_maps, query_patch[:1])


@pytest.fixture(scope="module")
def tiny_minigpt4():
    import vlmscope

    return vlmscope.load("tiny-minigpt4")


@pytest.mark.parametrize("arch", ["instructblip", "minigpt4"])
def test_qformer_explain_maps_equal_hand_carry_of_stock_attention(arch, request, images):
    """Step 0, one layer: stock eager LM attention of the last prompt row to the queries, carried through
    stock eager Q-Former cross-attentions (mean over layers and heads, CLS dropped), by explicit loops."""
    from vlmscope.models.tiny import build_tiny

    vlm = request.getfixturevalue(f"tiny_{arch}")
    layer = 2
    result = vlm.explain(images[1], PROMPT, layers=[layer], max_new_tokens=1)
    side = vlm.model.config.vision_config.image_size // vlm.model.config.vision_config.patch_size
    assert result.maps.shape == (1, 1, vlm.adapter.num_heads, side, side)

    oracle, _ = build_tiny(arch)  # the same seed: the same weights, eager everywhere
    oracle.set_attn_implementation("eager")
    inputs = _stock_inputs(vlm, images[1], vlm.adapter.render_prompt(PROMPT))
    feature_args = {k: inputs[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in inputs}
    with torch.no_grad():
        lm = oracle(**inputs, output_attentions=True).language_model_outputs.attentions[layer][0, :, -1]
        if arch == "instructblip":
            cross = oracle.get_image_features(inputs["pixel_values"], **feature_args,
                                              output_attentions=True).qformer_outputs.cross_attentions
        else:  # stock BLIP-2 does not pass output_attentions on to its Q-Former: call it as the model does
            embeds = oracle.vision_model(inputs["pixel_values"]).last_hidden_state
            cross = oracle.qformer(query_embeds=oracle.query_tokens.expand(1, -1, -1), encoder_hidden_states=embeds,
                                   encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
                                   output_attentions=True).cross_attentions
    query_positions = (inputs["input_ids"][0] == oracle.config.image_token_id).nonzero().flatten().tolist()
    q = oracle.config.num_query_tokens
    assert len(query_positions) == q
    to_queries = lm[:, query_positions].numpy()  # [heads, queries]
    mean_cross = sum(c[0].mean(dim=0) for c in cross).numpy() / len(cross)  # [queries, 1 + patches]
    heads, patches = to_queries.shape[0], side * side
    expected = np.zeros((heads, patches))
    for h in range(heads):
        for p in range(patches):
            expected[h, p] = sum(to_queries[h, j] * mean_cross[j, 1 + p] for j in range(q))
    assert result.maps[0, 0].reshape(heads, patches) == pytest.approx(expected, abs=1e-5)
    assert result.grids[0].name == "image" and result.grids[0].region == (0.0, 0.0, 1.0, 1.0)


def test_minigpt4_prompt_and_generate_equal_stock(tiny_minigpt4, images):
    vlm = tiny_minigpt4
    text = vlm.adapter.render_prompt(PROMPT)
    q = vlm.model.config.num_query_tokens
    assert text == f"###Human: <Img>{'<image>' * q}</Img> {PROMPT} ###Assistant:"  # OPERA's MiniGPT-4 template
    batch = vlm.encode([images[0]], [PROMPT])
    stock_inputs = _stock_inputs(vlm, images[0], text)
    assert torch.equal(batch.input_ids, stock_inputs["input_ids"])
    with torch.no_grad():
        stock = vlm.model.generate(**stock_inputs, max_new_tokens=6, do_sample=False, num_beams=2)
    ours = vlm.generate(images[0], PROMPT, max_new_tokens=6, decoding="beam:num_beams=2")
    tail = stock[0, stock_inputs["input_ids"].shape[1]:].tolist()
    assert ours.token_ids == tail[: len(ours.token_ids)] and len(ours.token_ids) >= 1


def test_shikra_projector_is_one_linear_map(tiny_shikra, images):
    model = tiny_shikra.model
    projector = model.model.multi_modal_projector
    inputs = tiny_shikra.encode([images[0]], [PROMPT]).model_inputs
    with torch.no_grad():
        features = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        direct = projector.linear_1(features[:, 1:])  # penultimate CLIP layer, CLS dropped, one linear
        stock = model.model.get_image_features(inputs["pixel_values"]).pooler_output
    stock = torch.cat(list(stock)) if isinstance(stock, list | tuple) else stock.reshape(direct.shape)
    assert torch.equal(stock.reshape(direct.shape), direct)


def test_shikra_prompt_is_vicuna_v1_with_image_markers(tiny_shikra):
    text = tiny_shikra.adapter.render_prompt(PROMPT)
    assert text.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert text.endswith(f"USER: <im_start><im_patch><im_end> {PROMPT} ASSISTANT:")
    batch = tiny_shikra.encode([make_blank()], [PROMPT])
    assert int(batch.image_mask.sum()) == 16  # <im_patch> expanded to the 4×4 patch grid


def make_blank():
    from PIL import Image

    return Image.new("RGB", (40, 30), "red")


@pytest.mark.parametrize("arch", ["instructblip", "minigpt4", "shikra"])
def test_cli_tiny_model_generate_opera_pai_and_explain(arch, tmp_path, image_file, capsys):
    from transformers import AutoModelForImageTextToText

    from vlmscope.cli import main

    model_dir = tmp_path / arch
    assert main(["tiny-model", "--arch", arch, "--out", str(model_dir)]) == 0
    assert AutoModelForImageTextToText.from_pretrained(model_dir) is not None  # stock loading
    capsys.readouterr()
    base = ["--model", str(model_dir), "--image", str(image_file), "--prompt", PROMPT, "--max-new-tokens", "3"]
    for extra in (["--decoding", "opera:num_beams=2"], ["--intervention", "pai:alpha=0.5"]):
        assert main(["generate", *base, *extra, "--json"]) == 0
        row = json.loads(capsys.readouterr().out)
        assert row["token_ids"] and row["image_tokens"] == (16 if arch == "shikra" else 8)
    out = tmp_path / "explain"
    assert main(["explain", *base, "--layers", "1", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    steps = doc["maps_shape"][0]
    assert doc["maps_shape"] == [steps, 1, 4, 4, 4] and 1 <= steps <= 3  # [steps, layers, heads, 4×4 patches]
    assert doc["files"]["overlays"]
