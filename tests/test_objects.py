"""Object tokens (bridges/objects.py) and their detector's objective (objectives/objects.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmbridge.config import ModelConfig, recipe_from_dict
from mmbridge.data.boxes import BoxFormatError
from mmbridge.data.processor import IGNORE
from mmbridge.eval.metrics import parse_box
from mmbridge.models.build import build_model
from mmbridge.objectives.objects import (
    DigitTokenizerError,
    ObjectLoss,
    box_template,
    digit_tokens,
    label_boxes,
    reading_order,
)
from mmbridge.runs import load_run
from mmbridge.train.trainer import Trainer
from tests.conftest import tiny_recipe_dict

OBJECTS = {"name": "objects", "objects": 2, "words": 6, "slots": 2, "hidden": 16}
WORDS = ("Ġred", "Ġblue", "Ġcircle", "Ġsquare", "Ġtwo", "Ġleft")


@pytest.fixture(scope="module")
def object_model(tiny_lm_dir, tiny_clip_dir, tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir, "drop_cls": True},
        bridge=OBJECTS,
        lm={"path": tiny_lm_dir},
        max_length=160,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    model.bridge.set_vocabulary(
        [tokenizer.convert_tokens_to_ids(t) for t in WORDS],
        digits,
        box_template(tokenizer, model.bridge.box_format, digits),
    )
    model.vision.requires_grad_(False)
    return model.eval(), proc


def answer_labels(proc, answers: list[str]) -> torch.Tensor:
    rows = [
        proc.encode([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": a}], 1).labels for a in answers
    ]
    width = max(map(len, rows))
    return torch.tensor([r + [IGNORE] * (width - len(r)) for r in rows])


def test_boxes_are_read_from_answer_tokens(tokenizer, object_model):
    _, proc = object_model
    labels = answer_labels(
        proc,
        [
            "[503, 71, 726, 941]",
            "3 shapes, [1, 2, 30, 400] and [9, 9, 1, 1]",
            "a red circle",
            "[5, 6, 7]",
            "[0.503, 0.071, 0.726, 0.941]",
            "at [0.12, 0.34, 0.56, 0.78]",
        ],
    )
    rows, boxes = label_boxes(labels, tokenizer)
    # the reversed box [9, 9, 1, 1], the bare count and the three-number group are not boxes; a decimal box is
    # the same box as its integer form, never the integers written in it ([0, 503, 0, 71] or [12, 34, 56, 78])
    assert rows.tolist() == [0, 1, 4, 5]
    assert boxes.tolist() == [[503, 71, 726, 941], [1, 2, 30, 400], [503, 71, 726, 941], [120, 340, 560, 780]]
    # the evaluator reads the same boxes from the same text
    assert parse_box("at [0.12, 0.34, 0.56, 0.78]") == (120, 340, 560, 780)
    with pytest.raises(BoxFormatError, match="integers above 999"):  # pixel coordinates: named, not misread
        label_boxes(answer_labels(proc, ["[12, 40, 1200, 800]"]), tokenizer)


def test_boxes_are_written_as_the_answers_write_them(object_model, tokenizer):
    bridge = object_model[0].bridge
    ids, written = bridge.box_text(torch.tensor([[0.0151, 0.0009, 0.5, 0.9999], [0.503, 0.071, 0.726, 0.941]]))
    want = tokenizer.encode("[15, 0, 500, 999]", add_special_tokens=False)
    assert ids[0, : len(want)].tolist() == want and written[0].tolist() == [True] * len(want) + [False] * 3
    assert ids[1].tolist() == tokenizer.encode("[503, 71, 726, 941]", add_special_tokens=False) + ids[1, -1:].tolist()
    assert written[1].sum() == 19 and len(bridge.box_template) == 20


def test_peaks_are_local_maxima_present_first_left_to_right(object_model):
    bridge = object_model[0].bridge
    logits = torch.full((2, 4, 4), -5.0)
    logits[0, 1, 3], logits[0, 1, 2], logits[0, 3, 0] = 4.0, 3.0, 2.0  # (1, 2) is next to the stronger (1, 3)
    logits[1, 0, 0] = -1.0  # nothing present: the best cells by objectness
    got = bridge.peaks(logits)
    assert got[0].tolist() == [3 * 4 + 0, 1 * 4 + 3]  # (3, 0) is left of (1, 3); (1, 2) is suppressed
    assert got[1, 0].item() == 0


def test_tokens_are_words_then_box_text_weighted_by_objectness(object_model, tokenizer):
    model, _ = object_model
    bridge, table = model.bridge, model.lm.get_input_embeddings().weight
    torch.manual_seed(1)
    px = torch.randn(2, 3, 32, 32)
    feats = model.vision_features(px)
    m = bridge.maps(feats)
    got = model.encode_images(px)
    assert got.shape == (2, bridge.num_tokens, table.shape[1]) and bridge.num_tokens == 2 * (2 + 20)
    cells = bridge.peaks(m["objectness"])
    rows, cols = bridge.grid
    for i in range(2):
        for k in range(2):
            r, c = divmod(int(cells[i, k]), cols)
            p = torch.sigmoid(m["objectness"][i, r, c])
            best = (m["embed"][i, r, c] @ table[bridge.word_ids].T).topk(2)
            index, order = best.indices.sort()  # reading order: the vocabulary's
            coords = [max(0, min(999, int(v * 1000))) for v in m["boxes"][i, r, c].tolist()]
            text = tokenizer.encode("[{}, {}, {}, {}]".format(*coords), add_special_tokens=False)
            want = [table[bridge.word_ids[index[s]]] * torch.sigmoid(best.values[order[s]]) for s in range(2)]
            want += [table[t] for t in text] + [torch.zeros_like(table[0])] * (20 - len(text))
            want = torch.stack(want) * p + bridge.slot_embed[k]
            torch.testing.assert_close(got[i, k * 22 : (k + 1) * 22], want, rtol=1e-5, atol=1e-6)


def test_lm_loss_trains_the_slot_embeddings_and_not_the_detector(object_model):
    model, proc = object_model
    enc = proc.encode([{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a red circle"}], 1)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    model.zero_grad(set_to_none=True)
    model(ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32), labels).loss.backward()
    assert model.bridge.slot_embed.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.bridge.named_parameters() if n != "slot_embed")
    model.zero_grad(set_to_none=True)


def test_objects_loss_is_objectness_box_and_mil_words(object_model, tokenizer):
    model, proc = object_model
    bridge = model.bridge
    loss_fn = ObjectLoss(model)
    loss_fn.tokenizer = tokenizer
    answers = ["[100, 200, 400, 700]", "a red circle"]
    labels = answer_labels(proc, answers)
    ids = [
        proc.encode([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": a}], 1).input_ids
        for a in answers
    ]
    width = max(map(len, ids))
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in ids])
    torch.manual_seed(2)
    px = torch.randn(2, 3, 32, 32)
    # the box answer's source boxes every object of the image: its other cells are empty
    out = loss_fn(
        model,
        {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": px,
            "boxes_all_objects": torch.tensor([True, False]),
        },
    )
    m = bridge.maps(model.vision_features(px))
    rows, cols = bridge.grid
    target = torch.tensor([0.1, 0.2, 0.4, 0.7])
    r, c = int(0.45 * rows), int(0.25 * cols)  # the box centre (0.25, 0.45)
    obj = torch.zeros(rows, cols)
    obj[r, c] = 1
    l_obj = F.binary_cross_entropy_with_logits(m["objectness"][0], obj, pos_weight=torch.tensor(10.0))
    pred = m["boxes"][0, r, c]
    lt, rb = torch.maximum(pred[:2], target[:2]), torch.minimum(pred[2:], target[2:])
    inter = (rb - lt).clamp(min=0).prod()
    iou = inter / ((pred[2:] - pred[:2]).prod() + (target[2:] - target[:2]).prod() - inter)
    l_box = 5 * F.l1_loss(pred, target) + 1 - iou
    cells = bridge.peaks(m["objectness"][1:])[0]
    present = m["objectness"][1].flatten()[cells] > 0
    present[0] = True  # the best cell counts even when none is present
    table = model.lm.get_input_embeddings().weight
    scores = (m["embed"][1].flatten(0, 1)[cells[present]] @ table[bridge.word_ids].T).amax(0)
    want_words = torch.tensor([1.0, 0, 1, 0, 0, 0])  # red, circle
    l_words = F.binary_cross_entropy_with_logits(scores, want_words)
    torch.testing.assert_close(out.loss, l_obj + l_box + 3 * l_words, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.terms["box"], l_box, rtol=1e-5, atol=1e-6)
    # the words read the box's place (the `where` features) but do not move the box or the objectness
    bridge.zero_grad(set_to_none=True)
    keep = torch.tensor([1])
    loss_fn(model, {"input_ids": input_ids[keep], "labels": labels[keep], "pixel_values": px[keep]}).loss.backward()
    assert bridge.where[0].weight.grad.abs().sum() > 0 and bridge.trunk.weight.grad.abs().sum() > 0
    assert bridge.head.weight.grad is None or bridge.head.weight.grad.abs().sum() == 0
    bridge.zero_grad(set_to_none=True)


def test_word_scores_follow_the_box_centre(object_model):
    """The detector embedding a cell's words are scored with reads the Fourier features of its box's centre (sin
    and cos of k·π·x, k·π·y, k = 1 … frequencies), not of the cell: moving every centre right changes what it
    reads to the features of the moved centre, and the cell's own features stay as they were."""
    bridge = object_model[0].bridge
    torch.manual_seed(3)
    feats = torch.randn(1, bridge.in_tokens, bridge.trunk.in_channels)
    seen = []  # per maps(): the `where` MLP's input and output, and the embedding layer's input
    hooks = [
        bridge.where.register_forward_hook(lambda m, i, o: seen.append({"fourier": i[0], "where": o})),
        bridge.embed.register_forward_hook(lambda m, i, o: seen[-1].update(embed_in=i[0])),
    ]
    try:
        with torch.no_grad():
            before = bridge.maps(feats)
            bridge.head.bias[1] += 2.0  # move every predicted centre right, the features unchanged
            after = bridge.maps(feats)
    finally:
        with torch.no_grad():
            bridge.head.bias[1] -= 2.0
        for h in hooks:
            h.remove()
    centres = [(m["boxes"][0, ..., :2] + m["boxes"][0, ..., 2:]).double() / 2 for m in (before, after)]
    assert (centres[1][..., 0] > centres[0][..., 0]).all()  # every centre moved right …
    assert torch.equal(before["boxes"][..., 1::2], after["boxes"][..., 1::2])  # … and not up or down
    k = torch.arange(1, bridge.frequencies + 1, dtype=torch.float64) * torch.pi
    for centre, read in zip(centres, seen):
        angle = centre[..., None] * k  # [R, C, (x, y), k]
        want = torch.cat([angle.sin(), angle.cos()], -1).flatten(-2)  # x: sin, cos; then y: sin, cos
        # fp32 angles up to 6π < 32 (two roundings of half-ulp 9.5e-7) of a centre the boxes give to 6e-8 (times
        # 6π: 1.1e-6), then sin/cos to 6e-8: |error| < 3.1e-6
        torch.testing.assert_close(read["fourier"][0].double(), want, rtol=0, atol=4e-6)
    assert (seen[1]["fourier"] - seen[0]["fourier"]).abs().amax() > 0.1  # the words read another place
    # the cell's own features (the embedding's input less the place) are the same: (h + w) - w in fp32 is h to
    # a half-ulp of |h + w| and one of |h|, so the two differ by at most 2 · 2^-24 · (|h + w| + |h|)
    trunk = [s["embed_in"] - s["where"] for s in seen]
    scale = max(s["embed_in"].abs().max() for s in seen).item() + max(t.abs().max() for t in trunk).item()
    torch.testing.assert_close(trunk[1], trunk[0], rtol=0, atol=2 * 2**-24 * scale)


def test_reading_order_is_the_order_answers_write_words(tokenizer):
    answers = [
        "A large red circle is at the top left. A small blue square is at the bottom right.",
        "There are two shapes. A red square is at the top right.",
        "a small blue circle, a large red square.",
    ]
    rows = [tokenizer.encode(a, add_special_tokens=False) for a in answers]
    ids = {
        w: tokenizer.encode(" " + w, add_special_tokens=False)[0]
        for w in ("large", "small", "red", "blue", "circle", "square", "top", "bottom", "left", "right")
    }
    got = reading_order(rows, tokenizer, [ids[w] for w in ("left", "square", "top", "red", "large", "circle")])
    # median offsets in their clause: large 1, red 2, square 3 = circle 3 (a tie keeps the given order), top 6,
    # left 8
    assert [tokenizer.decode([t]).strip() for t in got] == ["large", "red", "square", "circle", "top", "left"]


def test_an_objects_stage_then_an_lm_stage_saves_and_reloads_the_vocabulary(
    tiny_lm_dir, tiny_clip_dir, world, tmp_path
):
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge=OBJECTS)
    data["model"]["vision"]["drop_cls"] = True
    data["model"]["feature_cache"] = True
    data["stages"][0].update(
        objective={"name": "objects", "min_count": 2},
        steps=30,
        lr={"bridge": 1e-2},
        data={"world/train/detailed": 1.0, "world/train/grounding": 1.0},
        batch_size=16,
    )
    run = tmp_path / "run"
    Trainer(recipe_from_dict(data), run, progress=False).run()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = [r for r in rows if r["stage"] == "align"]
    assert first[-1]["loss_box"] < 0.7 * first[0]["loss_box"]  # the boxes are learned
    model, proc = load_run(run)[:2]
    digits = [proc.tokenizer.decode([t]) for t in model.bridge.digit_ids.tolist()]
    assert digits == [str(d) for d in range(10)]
    template = model.bridge.box_template.tolist()
    assert (
        proc.tokenizer.decode([t if t >= 0 else model.bridge.digit_ids[7] for t in template]) == "[777, 777, 777, 777]"
    )
    trained = model.bridge.word_ids.tolist()
    assert min(trained) >= 0 and len(set(trained)) == len(trained)
    assert all(proc.tokenizer.decode([t]).strip().isalpha() for t in trained)  # words from captions, not boxes


def test_export_names_the_objects_bridge(tiny_lm_dir, tiny_clip_dir, world):
    from mmbridge.interop.export import recipe_blockers

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge=OBJECTS)
    assert any(b.startswith("model.bridge.name: objects") for b in recipe_blockers(recipe_from_dict(data).model))


def test_excluded_words_stay_out_of_the_vocabulary(tokenizer):
    from mmbridge.objectives.concepts import choose_vocabulary

    answers = ["two red circle"] * 3 + ["two blue circle"] * 2 + ["three red square"]
    rows = [tokenizer.encode(a, add_special_tokens=False) for a in answers]

    def chosen(**kw):
        return {tokenizer.decode([t]).strip() for t in choose_vocabulary(rows, tokenizer, 3, min_count=1, **kw)}

    assert chosen() == {"two", "circle", "red"}  # in 5, 5 and 4 of the 6 answers
    assert chosen(exclude=["Two "]) == {"circle", "red", "blue"}


def objects_batch(proc, answers: list[str], **extra) -> dict:
    rows = [
        proc.encode([{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": a}], 1).input_ids
        for a in answers
    ]
    width = max(map(len, rows))
    torch.manual_seed(2)
    return {
        "input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
        "labels": answer_labels(proc, answers),
        "pixel_values": torch.randn(len(answers), 3, 32, 32),
        **extra,
    }


def test_a_box_is_a_positive_only_unless_its_source_boxes_all_objects(object_model, tokenizer):
    """A RefCOCO-style sample boxes one referent: off (the default), only its box's cell has an objectness loss;
    with boxes_all_objects every other cell of its image is a negative."""
    model, proc = object_model
    loss_fn = ObjectLoss(model)
    loss_fn.tokenizer = tokenizer
    answers = ["[100, 200, 400, 700]", "the box [500, 500, 700, 900]"]
    m = model.bridge.maps(model.vision_features(objects_batch(proc, answers)["pixel_values"]))
    rows, cols = model.bridge.grid
    cells = [(int(0.45 * rows), int(0.25 * cols)), (int(0.7 * rows), int(0.6 * cols))]  # the box centres
    obj = torch.zeros(2, rows, cols)
    for i, (r, c) in enumerate(cells):
        obj[i, r, c] = 1
    bce = F.binary_cross_entropy_with_logits(m["objectness"], obj, pos_weight=torch.tensor(10.0), reduction="none")
    box_cells = torch.stack([bce[i, r, c] for i, (r, c) in enumerate(cells)])
    cases = {  # flags → the cells counted: the box cells only, all cells, or all of the first image's and one
        None: box_cells.mean(),
        (False, False): box_cells.mean(),
        (True, True): bce.mean(),
        (True, False): torch.cat([bce[0].flatten(), box_cells[1:]]).mean(),
    }
    for flags, want in cases.items():
        extra = {} if flags is None else {"boxes_all_objects": torch.tensor(flags)}
        with torch.no_grad():
            out = loss_fn(model, objects_batch(proc, answers, **extra))
        torch.testing.assert_close(out.terms["objectness"], want, rtol=1e-5, atol=1e-6, msg=str(flags))


class Samples:
    """A stand-in dataset: `encoded` as ConversationDataset gives it, from answers."""

    def __init__(self, proc, answers: list[str]):
        self.labels = answer_labels(proc, answers).tolist()

    def __len__(self):
        return len(self.labels)

    def encoded(self, i: int) -> dict:
        return {"id": f"s{i}", "labels": self.labels[i], "where": f"refcoco.json: record {i} (id s{i})"}


def test_decimal_boxes_are_refused_naming_the_sample(object_model, tokenizer):
    """The bridge writes boxes as integers in [0, 999]: a stage whose boxes are decimals is refused as it starts
    (the samples read for the vocabulary), or at the first batch that holds one, naming the sample and the form."""
    model, proc = object_model
    data = Samples(proc, ["a red circle", "a blue square", "it is at [0.12, 0.34, 0.56, 0.78]"])
    with pytest.raises(
        BoxFormatError,
        match=r"sample refcoco.json: record 2 \(id s2\): box '\[0.12, 0.34, 0.56, "
        r"0.78\]' holds decimals in \[0, 1\]; .*integers in \[0, 999\]",
    ):
        ObjectLoss(model).read_stage_data(model, [data], tokenizer)
    loss_fn = ObjectLoss(model)
    loss_fn.tokenizer = tokenizer
    batch = objects_batch(proc, ["a red circle", "[0.1, 0.2, 0.3, 0.4]"], ids=["cap7", "ref9"])
    with pytest.raises(BoxFormatError, match="sample ref9: .*holds decimals in"):
        loss_fn(model, batch)


def test_a_tokenizer_that_merges_digits_is_named(object_model, tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{str(d): d + 1 for d in range(10)}, "503": 11, "71": 12, "[": 13, "]": 14, ",": 15}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()  # "503" is one word, and in the vocabulary
    merging = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", name_or_path="three-digit-bpe")
    assert merging.encode("503", add_special_tokens=False) == [11]
    with pytest.raises(
        DigitTokenizerError,
        match=r"the tokenizer \w+ three-digit-bpe writes '503' as "
        r"\['503'\]; .*every digit of a number as its own token",
    ):
        ObjectLoss(object_model[0]).read_stage_data(object_model[0], [], merging)  # before reading any data
    # SmolLM2's tokenizer writes numbers digit by digit, alone and in the box's text
    assert digit_tokens(tokenizer, "[{}, {}, {}, {}]") == [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]


def test_sources_say_whether_their_boxes_box_every_object(object_model, world, tiny_lm_dir, tiny_clip_dir):
    from mmbridge.config import load_recipe
    from mmbridge.data.dataset import Collator
    from mmbridge.data.sources import resolve_source
    from mmbridge.train.lmm_task import LMMTask

    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge=OBJECTS)
    grounding = str(world["manifest"]["train"]["grounding"])
    data["sources"] = {
        "referring": {"json": grounding, "images": world["images"]},
        "detection": {"json": grounding, "images": world["images"], "boxes_all_objects": True},
    }
    recipe = recipe_from_dict(data)
    flags = {
        n: resolve_source(recipe, n).boxes_all_objects
        for n in (
            "referring",
            "detection",
            "world/train/grounding",
            "world/train/multitask",
            "world/train/mixed",
            "world/test/grounding",
            "world/train/detailed",
        )
    }
    # the world's training grounding and multitask conversations box every object; a test record, one referent
    assert flags == {
        "referring": False,
        "detection": True,
        "world/train/grounding": True,
        "world/train/multitask": True,
        "world/train/mixed": False,
        "world/test/grounding": False,
        "world/train/detailed": False,
    }
    # the objects recipe's first stage keeps every object of its grounding answers boxed (on the tiny world here)
    demo = load_recipe("objects")
    demo.world = data["world"]
    assert {n: resolve_source(demo, n).boxes_all_objects for n in demo.stages[0].data} == {
        "world/train/detailed": False,
        "world/train/grounding": True,
    }
    task = LMMTask(recipe)
    task.processor = object_model[1]  # what build() would make, without a second model
    task.datasets = {}
    collate = Collator(task.processor)
    batch = collate([task.dataset(n)[0] for n in ("detection", "referring", "world/train/grounding")])
    assert batch["boxes_all_objects"].tolist() == [True, False, True]
    assert "boxes_all_objects" not in collate([task.dataset("referring")[0]])
