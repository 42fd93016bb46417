"""The composite model: image tokens filled by position, loss on targets only, KV-cached decoding."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import Choices, attentive


def batch(proc, convs_and_counts):
    encs = [proc.encode(c, n) for c, n in convs_and_counts]
    ids = proc.pad([e.input_ids for e in encs], proc.pad_id)
    labels = proc.pad([e.labels for e in encs], -100)
    lengths = torch.tensor([len(e.input_ids) for e in encs])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return ids, labels, mask


TWO = [{"from": "human", "value": "<image> and <image>: same?"}, {"from": "gpt", "value": "no"}]
ONE = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]


def test_image_positions_hold_bridge_outputs_in_order(tiny):
    model, proc = tiny
    ids, _, _ = batch(proc, [(ONE, 1), (TWO, 2)])
    pixels = torch.randn(3, 3, 32, 32)
    embeds = model.embed(ids, pixels)
    visual = model.encode_images(pixels)  # [3 images, 4 tokens, width]
    is_img = ids == model.image_token_id
    assert torch.equal(embeds[0][is_img[0]], visual[0])
    assert torch.equal(embeds[1][is_img[1]], visual[1:].reshape(-1, visual.shape[-1]))
    table = model.lm.get_input_embeddings().weight
    assert torch.equal(embeds[~is_img], table[ids[~is_img]])


def test_image_count_mismatch_is_an_error(tiny):
    model, proc = tiny
    ids, _, _ = batch(proc, [(TWO, 2)])
    with pytest.raises(ValueError, match="do not match"):
        model.embed(ids, torch.randn(1, 3, 32, 32))


def test_loss_matches_hugging_face_on_target_positions(tiny):
    model, proc = tiny
    ids, labels, mask = batch(proc, [(ONE, 1), (TWO, 2)])
    pixels = torch.randn(3, 3, 32, 32)
    ours = model(ids, mask, pixels, labels)
    embeds = model.embed(ids, pixels)
    ref = model.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    assert ours.num_targets == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(ours.loss, ref, rtol=1e-5, atol=1e-6)


def test_kv_cached_generation_equals_full_recompute(tiny):
    model, proc = tiny
    prompts = [proc.encode_prompt(ONE[:1]), proc.encode_prompt(TWO[:1])]
    ids = proc.pad(prompts, proc.pad_id, left=True)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with attentive(model), Choices(model) as choices:  # tokens that follow the whole input
        got = model.generate(ids, proc.left_mask(prompts), pixels, max_new_tokens=6, eos_token_ids=[])
        # reference: each prompt alone, no padding, no cache, argmax of a full forward at every step
        img_start = 0
        for row, prompt in enumerate(prompts):
            n_img = sum(t == model.image_token_id for t in prompt) // model.num_image_tokens
            seq = torch.tensor([prompt])
            px = pixels[img_start : img_start + n_img]
            img_start += n_img
            out, full = [], []
            with torch.no_grad():
                for _ in range(6):
                    full.append(model.lm(inputs_embeds=model.embed(seq, px)).logits[0, -1])
                    out.append(int(full[-1].argmax()))
                    seq = torch.cat([seq, torch.tensor([[out[-1]]])], 1)
            assert got[row] == out
            choices.assert_logits(row, full)  # every logit, not only the winners
    choices.assert_clear([6, 6])  # no near-tie the cache's or the padding's other rounding could flip
    assert got[0] != got[1] and len(choices.steps) == 6  # one choice per token: no forward pass for a 7th


def test_questions_on_one_image_share_its_prefix_and_decode_as_alone(tiny):
    from mmbridge.eval.evaluate import shared_prefixes

    model, proc = tiny
    left_mask = proc.left_mask
    questions = ["Colour?", "What shape is the red one?", "Where?", "Is there a blue circle here at all?"]
    prompts = [proc.encode_prompt([{"from": "human", "value": f"<image>\n{q}"}]) for q in questions]
    group = [0, 1, 0, 0]  # the second question is on another image
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))[:2]
    heads, tails = shared_prefixes(prompts, group, model.image_token_id)
    assert len(heads) == 2 and all(model.image_token_id not in t for t in tails)
    assert [h + t for h, t in zip([heads[g] for g in group], tails)] == prompts
    with attentive(model):  # the tokens follow the whole input
        got = model.generate(
            proc.pad(heads, proc.pad_id, left=True),
            left_mask(heads),
            pixels,
            max_new_tokens=5,
            eos_token_ids=[],
            suffix_ids=proc.pad(tails, proc.pad_id, left=True),
            suffix_mask=left_mask(tails),
            group=torch.tensor(group),
        )
        with Choices(model) as choices:
            want = model.generate(
                proc.pad(prompts, proc.pad_id, left=True),
                left_mask(prompts),
                pixels[group],
                max_new_tokens=5,
                eos_token_ids=[],
            )
    choices.assert_clear([5] * 4)  # no near-tie the shared prefix's other rounding could flip
    assert got == want and len({tuple(w) for w in want}) > 1  # the rows' answers differ
    # a question before its image cannot share the image's prefix
    before = [proc.encode_prompt([{"from": "human", "value": f"{q}\n<image>"}]) for q in questions[:2]]
    assert shared_prefixes(before, [0, 0], model.image_token_id) is None
