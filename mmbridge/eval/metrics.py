"""Evaluation metrics: captioning (BLEU-4, CIDEr), VQA, yes/no probes, grounding, baselines.

All functions are pure Python (plus pycocoevalcap for BLEU/CIDEr) and need no Java.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from itertools import chain

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from mmbridge.data.boxes import BOX_PATTERN, BoxFormatError, read_match

Box = Sequence[float]

# ----------------------------------------------------------------------------- captioning

_CLITIC_NT = re.compile(r"(?<=[^\W_])n't\b")
_CLITIC = re.compile(r"(?<=[^\W_])'(s|re|ve|ll|d|m)\b")
_CAPTION_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,]\d+)+|[^\W_]+(?:-[^\W_]+)*")


def caption_tokenize(text: str) -> str:
    """Lowercase and tokenise a caption, a pure-Python stand-in for the PTB tokenizer.

    Like PTB, clitics are split off ("man's" -> "man 's", "don't" -> "do n't"), hyphenated
    words and numbers such as "2.5" / "1,000" stay whole, and all other punctuation is dropped.
    """
    text = _CLITIC_NT.sub(" n't", text.lower())
    text = _CLITIC.sub(r" '\1", text)
    return " ".join(_CAPTION_TOKEN.findall(text))


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """Corpus BLEU-4 and CIDEr (pycocoevalcap) on tokenised text.

    Returns ``{"bleu4", "cider", "n"}`` with raw values: BLEU in [0, 1], CIDEr on
    pycocoevalcap's 0-10 scale (0.85 means 0.85). Note that pycocoevalcap's CIDEr computes
    IDF over the references of the evaluated images only, so the score depends on the
    evaluated set (a single image always scores 0; n-grams found in every image's
    references get zero weight). Prediction and reference ids must match exactly.
    """
    for key in references:
        if key not in predictions:
            raise ValueError(f"no prediction for id {key!r}")
    for key in predictions:
        if key not in references:
            raise ValueError(f"no references for id {key!r}")
    if not predictions:
        raise ValueError("caption_scores needs at least one item")
    res = {k: [caption_tokenize(v)] for k, v in predictions.items()}
    gts: dict[str, list[str]] = {}
    for k, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references for id {k!r} must be a non-empty list of strings")
        gts[k] = [caption_tokenize(r) for r in refs]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "n": len(res)}


# ----------------------------------------------------------------------------- VQA

_VQA_PUNCT = set(';/[]"{}()=+\\_-><@`,?!')  # the official VQA list (no "." or "'")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "dont": "don't",
    "doesnt": "doesn't",
    "didnt": "didn't",
    "isnt": "isn't",
    "arent": "aren't",
    "wasnt": "wasn't",
    "werent": "weren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "shouldnt": "shouldn't",
    "wouldnt": "wouldn't",
    "wont": "won't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hadnt": "hadn't",
    "im": "i'm",
    "ive": "i've",
    "youre": "you're",
    "theyre": "they're",
    "thats": "that's",
    "whats": "what's",
}


def normalize_answer(s: str) -> str:
    """Normalise a VQA answer like the official VQA evaluation (slightly simplified).

    Lowercase; drop commas inside numbers ("1,000" -> "1000"); drop periods not followed by a
    digit (keeps "2.5", strips "yes."); other VQA punctuation becomes a space; number words
    zero..ten (and "none", as in the official map) become digits; articles are removed;
    a small table restores contractions ("dont" -> "don't"); whitespace is collapsed.
    """
    s = s.replace("\n", " ").replace("\t", " ").strip().lower()
    s = re.sub(r"(?<=\d),(?=\d)", "", s)
    s = re.sub(r"\.(?!\d)", "", s)
    s = "".join(" " if ch in _VQA_PUNCT else ch for ch in s)
    words = []
    for w in s.split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def _vqa_item_score(pred: str, gold: str | Sequence[str]) -> float:
    """Score one normalised prediction against one gold answer or an annotator list."""
    if isinstance(gold, str):
        return float(pred == normalize_answer(gold))
    golds = [normalize_answer(g) for g in gold]
    if len(golds) == 0:
        raise ValueError("empty list of gold answers")
    if len(golds) == 1:
        return float(pred == golds[0])
    # Official VQA metric: average over leave-one-annotator-out subsets of min(#matches/3, 1).
    total = 0.0
    for i in range(len(golds)):
        matches = sum(g == pred for j, g in enumerate(golds) if j != i)
        total += min(matches / 3.0, 1.0)
    return total / len(golds)


def vqa_accuracy(predictions: list[str], answers: list[str | list[str]]) -> dict:
    """VQA accuracy: ``{"vqa_accuracy", "n"}``.

    A single gold string (or one-element list) means exact match after normalisation. A list
    of annotator answers (VQAv2: 10) uses the official metric: min(#matches/3, 1) averaged
    over the leave-one-out subsets (10 choose 9). Unlike the official script, answers are
    always normalised, even when all annotators agree.
    """
    _check_lengths(predictions, answers)
    scores = [_vqa_item_score(normalize_answer(p), a) for p, a in zip(predictions, answers)]
    return {"vqa_accuracy": sum(scores) / len(scores), "n": len(scores)}


def vqa_accuracy_by_type(
    predictions: list[str], answers: list[str | list[str]], qtypes: list[str | None]
) -> dict[str, float]:
    """VQA accuracy per question type (rounded to 4 places); items whose type is None are left out."""
    _check_lengths(predictions, answers)
    _check_lengths(predictions, qtypes)
    groups: dict[str, tuple[list, list]] = {}
    for p, a, t in zip(predictions, answers, qtypes):
        if t is not None:
            groups.setdefault(t, ([], []))[0].append(p)
            groups[t][1].append(a)
    return {t: round(vqa_accuracy(*groups[t])["vqa_accuracy"], 4) for t in sorted(groups)}


def _is_yes(text: str) -> bool:
    words = normalize_answer(text).split()
    return bool(words) and words[0] == "yes"


def yes_no_scores(predictions: list[str], answers: list[str]) -> dict:
    """POPE-style yes/no scores with "yes" as the positive class.

    A prediction (or gold answer) is "yes" if the first word of its normalised form is "yes";
    anything else counts as "no". Returns accuracy, precision, recall, f1, yes_ratio (share of
    predictions that are "yes") and n. Undefined ratios (0/0) are reported as 0.0.
    """
    _check_lengths(predictions, answers)
    pred = [_is_yes(p) for p in predictions]
    gold = [_is_yes(a) for a in answers]
    tp = sum(p and g for p, g in zip(pred, gold))
    correct = sum(p == g for p, g in zip(pred, gold))
    precision = tp / sum(pred) if any(pred) else 0.0
    recall = tp / sum(gold) if any(gold) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    n = len(pred)
    return {
        "accuracy": correct / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred) / n,
        "n": n,
    }


# ----------------------------------------------------------------------------- grounding


def parse_box(text: str) -> tuple[int, int, int, int] | None:
    """Parse the first box "[x0, y0, x1, y1]" (or "(...)", or space-separated) in ``text``.

    Coordinates are integers in [0, 999] or decimals in [0, 1], read to [0, 999] (`data/boxes.py`, the
    reader training uses too), with x0 <= x1 and y0 <= y1. Only the first box-like group counts: if it is
    invalid (another form, reversed) the result is None even when a later valid box exists. None if there
    is no box.
    """
    m = BOX_PATTERN.search(text)
    if m is None:
        return None
    try:
        box = read_match(m)
    except BoxFormatError:
        return None
    return None if box is None else box.box


def box_iou(a: Box, b: Box) -> float:
    """IoU of two (x0, y0, x1, y1) boxes in continuous coordinates: `objectives.objects.box_iou` (the one IoU of
    mmbridge) in float64, with no clamp of the union beyond float64's smallest normal number.

    Area is (x1 - x0) * (y1 - y0). Identical boxes score 1.0 (even zero-area ones); otherwise
    a zero union (or any zero-area box, which has no intersection area) scores 0.0.
    """
    import torch

    from mmbridge.objectives.objects import box_iou as paired_iou

    if tuple(a) == tuple(b):
        return 1.0
    pair = torch.tensor([list(a), list(b)], dtype=torch.float64)
    # a positive intersection implies a positive union; with none, 0 / max(union, tiny) is 0
    return float(paired_iou(pair[:1], pair[1:], eps=torch.finfo(torch.float64).tiny)[0])


def grounding_scores(predictions: list[str], boxes: list[list[int]]) -> dict:
    """Grounding scores: Acc@0.5 (IoU >= 0.5), mean IoU, #unparsed answers, n.

    An answer without a valid box is a miss with IoU 0 and is counted in ``unparsed``.
    """
    _check_lengths(predictions, boxes)
    ious: list[float] = []
    unparsed = 0
    for text, gold in zip(predictions, boxes):
        box = parse_box(text)
        if box is None:
            unparsed += 1
            ious.append(0.0)
        else:
            ious.append(box_iou(box, gold))
    n = len(ious)
    return {"grounding_acc50": sum(i >= 0.5 for i in ious) / n, "unparsed": unparsed, "mean_iou": sum(ious) / n, "n": n}


# ----------------------------------------------------------------------------- baselines


def majority_vqa_baseline(
    train_answers_by_qtype: dict[str, list[str]], test_qtypes: list[str], test_answers: list[str]
) -> float:
    """Accuracy of predicting each question type's most frequent (normalised) training answer.

    Ties go to the answer seen first; unseen question types get the overall most frequent
    training answer. Scored with :func:`vqa_accuracy`.
    """
    _check_lengths(test_qtypes, test_answers)
    majority = {
        q: Counter(map(normalize_answer, a)).most_common(1)[0][0] for q, a in train_answers_by_qtype.items() if a
    }
    all_train = list(chain.from_iterable(train_answers_by_qtype.values()))
    if not all_train:
        raise ValueError("no training answers")
    fallback = Counter(map(normalize_answer, all_train)).most_common(1)[0][0]
    preds = [majority.get(q, fallback) for q in test_qtypes]
    return vqa_accuracy(preds, list(test_answers))["vqa_accuracy"]


def center_box_baseline(boxes: list[list[int]], train_boxes: list[list[int]]) -> float:
    """Acc@0.5 of predicting the mean training box (unrounded) for every item."""
    if not train_boxes:
        raise ValueError("no training boxes")
    if not boxes:
        raise ValueError("no evaluation boxes")
    mean = [sum(b[i] for b in train_boxes) / len(train_boxes) for i in range(4)]
    return sum(box_iou(mean, b) >= 0.5 for b in boxes) / len(boxes)


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} predictions vs {len(b)} answers")
    if not a:
        raise ValueError("need at least one item")
