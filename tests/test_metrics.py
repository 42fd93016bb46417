"""Hand-made cases with known answers for mmbridge.eval.metrics."""

from __future__ import annotations

import pytest

from mmbridge.eval.metrics import (
    box_iou,
    caption_scores,
    caption_tokenize,
    center_box_baseline,
    grounding_scores,
    majority_vqa_baseline,
    normalize_answer,
    parse_box,
    vqa_accuracy,
    vqa_accuracy_by_type,
    yes_no_scores,
)

# ----------------------------------------------------------------------------- captioning


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A man's dog, running!", "a man 's dog running"),
        ("Don't  STOP.", "do n't stop"),
        ("2.5 kg, 1,000 t-shirts", "2.5 kg 1,000 t-shirts"),
        ("'quoted'   (word)\n", "quoted word"),
        ("", ""),
    ],
)
def test_caption_tokenize(text: str, expected: str) -> None:
    assert caption_tokenize(text) == expected


CAP_A = "A dog runs across the green grass."
CAP_B = "Two cats sleep on a red sofa."


def test_perfect_captions_identical_refs() -> None:
    preds = {"a": CAP_A, "b": CAP_B}
    refs = {"a": [CAP_A.lower()] * 3, "b": [CAP_B.upper()] * 3}
    out = caption_scores(preds, refs)
    assert out["n"] == 2
    assert out["bleu4"] == pytest.approx(1.0, abs=1e-6)
    # Cosine similarity 1 for every n-gram order, no length penalty -> exactly 10.
    assert out["cider"] == pytest.approx(10.0, abs=1e-6)


def test_cider_several_refs_and_wrong_caption() -> None:
    refs = {
        "a": [CAP_A, "a brown dog is running on grass", "the puppy plays in a park"],
        "b": [CAP_B, "cats napping on a couch", "two kittens are lying on the sofa"],
    }
    perfect = caption_scores({"a": CAP_A, "b": CAP_B}, refs)
    wrong = caption_scores({"a": "a plate of food on a table", "b": CAP_B}, refs)
    assert 0.0 < perfect["cider"] < 10.0  # matches only one of three different refs
    assert wrong["cider"] < perfect["cider"]
    assert wrong["bleu4"] < perfect["bleu4"]


def test_cider_single_image_is_zero() -> None:
    # IDF is computed over the evaluated set: with one image every n-gram has zero weight.
    out = caption_scores({"a": CAP_A}, {"a": [CAP_A]})
    assert out["cider"] == 0.0
    assert out["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_caption_scores_id_errors() -> None:
    with pytest.raises(ValueError, match="img7"):
        caption_scores({"a": CAP_A}, {"a": [CAP_A], "img7": [CAP_B]})
    with pytest.raises(ValueError, match="extra9"):
        caption_scores({"a": CAP_A, "extra9": CAP_B}, {"a": [CAP_A]})


# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),
        ("The Red", "red"),
        ("a circle", "circle"),
        ("yes.", "yes"),
        ("2.5", "2.5"),
        ("1,000", "1000"),
        ("dont know", "don't know"),
        ("  Black-and-white\t", "black and white"),
        ("red, blue", "red blue"),
        ("none", "0"),
        ("ten apples", "10 apples"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_single_answers() -> None:
    out = vqa_accuracy(["two", "blue", "Cat."], ["2", "red", "the cat"])
    assert out == {"vqa_accuracy": pytest.approx(2 / 3), "n": 3}


def test_vqa_accuracy_ten_annotators() -> None:
    gold = ["2"] * 3 + ["3"] * 7
    # 3 matches: 3 subsets keep 2 matches (2/3), 7 keep 3 (1) -> (2 + 7) / 10.
    assert vqa_accuracy(["two"], [gold])["vqa_accuracy"] == pytest.approx(0.9)
    assert vqa_accuracy(["3"], [gold])["vqa_accuracy"] == pytest.approx(1.0)
    # 1 match: its own subset scores 0, the other 9 score 1/3 -> 0.3.
    one = ["2"] + ["3"] * 9
    assert vqa_accuracy(["2"], [one])["vqa_accuracy"] == pytest.approx(0.3)
    assert vqa_accuracy(["4"], [one])["vqa_accuracy"] == 0.0
    # Mixing item kinds: average of 1.0 (exact) and 0.9.
    mixed = vqa_accuracy(["red", "2"], ["Red", gold])
    assert mixed == {"vqa_accuracy": pytest.approx(0.95), "n": 2}


def test_vqa_accuracy_by_type() -> None:
    preds = ["Red.", "blue", "2", "two", "yes"]
    golds = ["red", "green", "2", "3", "yes"]
    got = vqa_accuracy_by_type(preds, golds, ["colour", "colour", "count", "count", None])
    assert got == {"colour": 0.5, "count": 0.5}  # the untyped item is left out
    with pytest.raises(ValueError):
        vqa_accuracy_by_type(preds, golds, ["colour"])


def test_vqa_accuracy_length_mismatch() -> None:
    with pytest.raises(ValueError):
        vqa_accuracy(["a", "b"], ["a"])


def test_yes_no_scores() -> None:
    preds = ["Yes", "yes, there is", "no", "No.", "yes", "no"]
    golds = ["yes", "no", "yes", "no", "yes", "yes"]
    out = yes_no_scores(preds, golds)
    assert out["n"] == 6
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 4)
    assert out["f1"] == pytest.approx(4 / 7)
    assert out["yes_ratio"] == pytest.approx(3 / 6)


def test_yes_no_first_word_only() -> None:
    out = yes_no_scores(["Yesterday it was", "I think yes"], ["no", "no"])
    assert out["yes_ratio"] == 0.0
    assert out["accuracy"] == 1.0
    assert out["precision"] == 0.0  # 0/0 reported as 0


# ----------------------------------------------------------------------------- grounding


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[10, 20, 30, 40]", (10, 20, 30, 40)),
        ("(10,20,30,40)", (10, 20, 30, 40)),
        ("[10 20 30 40]", (10, 20, 30, 40)),
        ("The box is [ 5 , 6 , 7 , 8 ] I think.", (5, 6, 7, 8)),
        ("[1,2,3,4] then [5,6,7,8]", (1, 2, 3, 4)),
        ("[999, 999, 999, 999]", (999, 999, 999, 999)),
        ("[0, 0, 1000, 10]", None),
        ("[-1, 2, 3, 4]", None),
        ("[30, 20, 10, 40]", None),
        ("[10, 40, 30, 20]", None),
        ("[0.1, 0.2, 0.3, 0.4]", (100, 200, 300, 400)),  # decimals in [0, 1] (LLaVA-1.5, Shikra)
        ("[0.503, 0.071, 0.726, 0.941]", (503, 71, 726, 941)),
        ("(0, 0.5, 1.0, 0.75)", (0, 500, 999, 750)),  # 1.0 is the last integer coordinate
        ("[0.1, 0.2, 1.3, 0.4]", None),  # decimals above 1
        ("[0.5, 0.2, 0.3, 0.4]", None),  # reversed decimals
        ("[1, 2, 3]", None),
        ("[1, 2, 3, 4)", None),
        ("no box here", None),
    ],
)
def test_parse_box(text: str, expected: tuple[int, int, int, int] | None) -> None:
    assert parse_box(text) == expected


def test_boxes_in_both_forms_are_one_box_and_other_forms_are_named() -> None:
    from mmbridge.data.boxes import DECIMAL, INTEGER, BoxFormatError, box_of, find_boxes

    got = find_boxes("a [503, 71, 726, 941] and b [0.503, 0.071, 0.726, 0.941], c [0.12, 0.34, 0.56, 0.78]")
    assert [(b.box, b.form) for b in got] == [
        ((503, 71, 726, 941), INTEGER),
        ((503, 71, 726, 941), DECIMAL),
        ((120, 340, 560, 780), DECIMAL),
    ]
    # a decimal box is never read as the integers in its text ([0, 12, 0, 34] or [12, 34, 56, 78])
    assert box_of([0.12, 0.34, 0.56, 0.78]).box == (120, 340, 560, 780) == parse_box("[0.12,0.34,0.56,0.78]")
    for text, form in [
        ("[10, 20, 1200, 800]", "integers above 999"),
        ("[0.1, 0.2, 1.5, 0.4]", "decimals above 1"),
        ("[-1, 2, 3, 4]", "negative"),
    ]:
        with pytest.raises(BoxFormatError, match=r"holds " + form + r".*integers in \[0, 999\].*decimals in \[0, 1\]"):
            find_boxes(f"it is at {text}.")
        assert parse_box(text) is None  # a prediction in such a form is a miss


def test_gold_boxes_read_both_forms() -> None:
    from mmbridge.eval.evaluate import gold

    record = {"id": "r", "conversations": [{"from": "gpt", "value": "[0.12, 0.34, 0.56, 0.78]"}]}
    assert gold(record, "grounding") == [120, 340, 560, 780]
    assert gold({**record, "box": [0.12, 0.34, 0.56, 0.78]}, "grounding") == [120, 340, 560, 780]
    assert gold({**record, "box": [120, 340, 560, 780]}, "grounding") == [120, 340, 560, 780]
    with pytest.raises(ValueError, match="record r: its 'box'.*integers above 999"):
        gold({**record, "box": [12, 34, 1056, 78]}, "grounding")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
        ([0, 0, 10, 10], [5, 0, 15, 10], 1 / 3),
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges
        ([0, 0, 10, 10], [0, 0, 5, 10], 0.5),  # contained
        ([5, 5, 5, 5], [5, 5, 5, 5], 1.0),  # identical zero-area boxes
        ([5, 5, 5, 5], [0, 0, 10, 10], 0.0),  # zero-area inside a box
        ([0, 0, 0, 10], [0, 0, 10, 0], 0.0),  # two different zero-area boxes
    ],
)
def test_box_iou(a: list[int], b: list[int], expected: float) -> None:
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_grounding_scores_with_unparsed() -> None:
    preds = ["[0, 0, 10, 10]", "box (5,0,15,10)", "I don't know", "[0,0,10,5]"]
    gold = [[0, 0, 10, 10]] * 4
    out = grounding_scores(preds, gold)
    assert out["n"] == 4
    assert out["unparsed"] == 1
    assert out["grounding_acc50"] == pytest.approx(0.5)  # IoUs 1, 1/3, 0, 0.5
    assert out["mean_iou"] == pytest.approx((1 + 1 / 3 + 0 + 0.5) / 4)


# ----------------------------------------------------------------------------- baselines


def test_majority_vqa_baseline() -> None:
    train = {
        "what color": ["red", "Red", "blue"],
        "how many": ["two", "2", "3"],
        "is": ["yes", "no", "no"],
    }
    qtypes = ["what color", "how many", "is", "is", "where", "what"]
    answers = ["red", "3", "no", "yes", "the table", "Red."]
    # Predictions: red, 2, no, no, red (unseen -> overall majority), red -> 3 of 6 right.
    assert majority_vqa_baseline(train, qtypes, answers) == pytest.approx(0.5)


def test_center_box_baseline() -> None:
    train = [[0, 0, 10, 10], [20, 20, 30, 30]]  # mean box [10, 10, 20, 20]
    boxes = [[10, 10, 20, 20], [12, 10, 22, 20], [15, 10, 25, 20], [100, 100, 110, 110]]
    # IoUs: 1, 80/120, 50/150, 0 -> 2 of 4 hits.
    assert center_box_baseline(boxes, train) == pytest.approx(0.5)


def test_box_iou_is_the_objectives_iou_and_gives_what_the_float_formula_gave() -> None:
    """One IoU (objectives.objects.box_iou) for the metric too: on random boxes, including inverted and degenerate
    ones, the value of the float formula the metric used before, to the last bit (float64 does the same operations
    in the same order)."""
    import random

    def before(a, b):  # eval.metrics.box_iou as it was
        if tuple(a) == tuple(b):
            return 1.0
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return float(inter / union) if union > 0 else 0.0

    rng = random.Random(0)
    for draw in (lambda: rng.randint(0, 12), lambda: rng.uniform(0, 1)):
        for _ in range(2000):
            a, b = [draw() for _ in range(4)], [draw() for _ in range(4)]
            assert box_iou(a, b) == before(a, b), (a, b)
