"""The `objects` objective: an object-token bridge's detector, from boxes and captions (bridges/objects.py).

Samples whose answers hold boxes train objectness and boxes: the cell under each box centre is an object (binary
cross-entropy on its objectness, weighted `positive_weight`) and regresses its box there (L1 and 1 − IoU).
Whether the other cells are empty depends on the sample's source: with `boxes_all_objects: true` (a source
option, `sources: {name: {json: ..., boxes_all_objects: true}}`; the built-in world's training grounding and
multitask sets) its answers box every object of the image, as detection data does, so every cell without a box
is a negative. Off (the default: RefCOCO-style data boxes one referent, and the image's other instances would be
contradictory negatives), a sample's boxes are positives only: the objectness loss counts only its box cells,
so the detector learns empty cells only from sources that box every object. Samples whose answers hold no box
(captions, descriptions) train the word detectors by multiple-instance learning: an image holds a word if one
of its objects does, its objects being the cells the bridge would pick and deems present (`peaks` with positive
objectness, at least the best one), scored with binary cross-entropy against the vocabulary words of the
answers, as the `concepts` objective does over regions. The LM only lends its word embeddings and runs no
forward pass.

Boxes are read from the decoded answers by the reader the evaluator uses (data/boxes.py): integers in [0, 999]
or decimals in [0, 1]; any other form raises `BoxFormatError` naming the sample. The bridge writes boxes back
to the LM as integers in [0, 999], so decimal boxes are refused too, at the start of the stage (in the samples
read for the vocabulary) or at the first batch that holds one: the LM would read one form and answer in another.

`read_stage_data` checks that the tokenizer writes numbers digit by digit (`DigitTokenizerError`), tokenises
the bridge's `box_format`, and chooses the vocabulary from the stage's box-free answers and puts it in reading
order (by where each word tends to stand in its clause: "a large red circle is at the top left" gives size,
colour, shape, place). The bridge is a word bottleneck over that vocabulary, not a continuous bridge, and the
vocabulary fits this data only (the demo's `words: 19` and `exclude` fit the shapes world's inventory).
Assumed: one image per sample, one object per grid cell (two box centres in one cell train one object), boxes
as integers in [0, 999], a tokenizer that writes numbers digit by digit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmbridge.data.boxes import INTEGER, BoxFormatError, TextBox, find_boxes
from mmbridge.data.processor import IGNORE
from mmbridge.loss_norm import target_total
from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective
from mmbridge.objectives.concepts import answer_samples, choose_vocabulary


class DigitTokenizerError(ValueError):
    """The tokenizer does not write a number one token per digit, as the object bridge's box text needs."""


def object_bridge(model):
    bridge = getattr(model, "bridge", None)
    if not hasattr(bridge, "peaks"):
        raise ValueError(
            "objective objects: the model's bridge is not an object-token bridge; set "
            "model.bridge: {name: objects, ...}"
        )
    return bridge


def answer_text(row: list[int], tokenizer) -> str:
    """A label row's answer tokens decoded, each run between IGNOREs on its own, the runs joined by a space (the
    processor leaves a token of spaces alone out of the labels, so "[503, 71" runs as "[503," and "71")."""
    runs, run = [], []
    for t in [*row, IGNORE]:
        if t != IGNORE:
            run.append(t)
        elif run:
            runs.append(tokenizer.decode(run, skip_special_tokens=True))
            run = []
    return " ".join(runs)


def answer_boxes(labels: torch.Tensor, tokenizer) -> list[list[TextBox]]:
    """The boxes in each row's answers (`labels` [B, L], IGNORE outside answers), by `data.boxes.find_boxes`."""
    return [find_boxes(answer_text(row, tokenizer)) for row in labels.tolist()]


def label_boxes(labels: torch.Tensor, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes written in answer tokens → (row of each box [N], boxes [N, 4] as integers in [0, 999])."""
    found = answer_boxes(labels, tokenizer)
    rows = [r for r, boxes in enumerate(found) for _ in boxes]
    boxes = [b.box for row in found for b in row]
    return (
        torch.tensor(rows, dtype=torch.long, device=labels.device),
        torch.tensor(boxes, dtype=torch.long, device=labels.device).reshape(-1, 4),
    )


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """IoU of paired boxes [N, 4] (x0, y0, x1, y1), the union clamped to at least `eps` (the loss's default keeps
    the gradient finite). The one IoU of mmbridge: `eval.metrics.box_iou` is this in float64 on two boxes."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1) + (b[:, 2:] - b[:, :2]).prod(1)
    return inter / (area - inter).clamp(min=eps)


def digit_tokens(tokenizer, box_format: str) -> list[int]:
    """The token ids of the digits 0-9, after checking that the tokenizer writes every digit of a number as its
    own token, alone and inside `box_format`; DigitTokenizerError (naming the tokenizer) if not."""
    name = f"{type(tokenizer).__name__} {getattr(tokenizer, 'name_or_path', '') or '(unnamed)'}"

    def refuse(what: str):
        raise DigitTokenizerError(
            f"objective objects: the tokenizer {name} {what}; the objects bridge writes boxes digit by digit and "
            "needs a tokenizer that writes every digit of a number as its own token (as SmolLM2's does; "
            "Llama-3's, which writes up to three digits as one token, does not)"
        )

    digits = []
    for d in range(10):
        ids = tokenizer.encode(str(d), add_special_tokens=False)
        if len(ids) != 1:
            refuse(f"writes the digit {d} as {len(ids)} tokens")
        digits.append(ids[0])
    for text in ("503", "71", "999", "100", box_format.format(503, 71, 726, 941)):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if sum(t in digits for t in ids) != sum(c.isdigit() for c in text):
            refuse(f"writes {text!r} as {tokenizer.convert_ids_to_tokens(ids)}")
    return digits


def box_template(tokenizer, box_format: str, digits: list[int]) -> list[int]:
    """`box_format` with three-digit coordinates, tokenised: its token ids with -1 for each digit."""
    ids = tokenizer.encode(box_format.format(*["100"] * 4), add_special_tokens=False)
    return [-1 if t in digits else t for t in ids]


def reading_order(label_rows, tokenizer, words: list[int]) -> list[int]:
    """`words` sorted by their median offset from the start of their clause (the answer's start or the last
    token that is not a word, e.g. "." or ","), over the answers `label_rows`; ties keep the given order."""
    wanted, offsets = set(words), {w: [] for w in words}
    is_word: dict[int, bool] = {}
    for labels in label_rows:
        offset = 0
        for tok in (int(t) for t in labels if t != IGNORE):
            if tok not in is_word:
                is_word[tok] = tokenizer.decode([tok]).strip().isalpha()
            if not is_word[tok]:
                offset = 0
                continue
            if tok in wanted:
                offsets[tok].append(offset)
            offset += 1
    key = {w: float(torch.tensor(o, dtype=torch.float).median()) if o else float("inf") for w, o in offsets.items()}
    return sorted(words, key=lambda w: key[w])


@OBJECTIVES.register("objects")
class ObjectLoss(Objective):
    """Objectness and boxes from box answers, words by MIL from the other answers. `box_weight` scales the L1;
    `positive_weight` an object cell's objectness loss (a grid has far more empty cells than objects);
    `word_weight` the words' loss (3: the words lag the boxes, which converge within a few hundred steps).
    `exclude`: answer words kept out of the vocabulary, e.g. those that tell of the whole image ("two shapes")
    rather than of one object, which would otherwise take an object's slots."""

    runs_lm = False  # the trainer counts the encoder's and bridge's FLOPs only

    def __init__(
        self,
        model,
        samples: int = 4000,
        min_count: int = 3,
        max_share: float = 0.9,
        box_weight: float = 5.0,
        positive_weight: float = 10.0,
        word_weight: float = 3.0,
        exclude: list[str] | tuple = (),
    ):
        super().__init__(model)
        object_bridge(model)
        self.exclude = list(exclude)
        self.samples, self.min_count, self.max_share = samples, min_count, max_share
        self.box_weight, self.positive_weight, self.word_weight = box_weight, positive_weight, word_weight
        self.tokenizer = None  # set by read_stage_data: the boxes are read from the decoded answers

    def integer_boxes(self, row: list[int], sample: str, box_format: str) -> list[TextBox]:
        """The boxes of one sample's answers; BoxFormatError naming `sample` for any not in [0, 999] integers."""
        where = f"objective objects: sample {sample}: "
        try:
            boxes = find_boxes(answer_text(row, self.tokenizer))
        except BoxFormatError as e:
            raise BoxFormatError(e.text, e.form, where=where) from e
        for b in boxes:
            if b.form != INTEGER:
                raise BoxFormatError(
                    b.text,
                    "decimals in [0, 1]",
                    where=where,
                    supported=f"the objects bridge writes boxes to the LM as integers in [0, 999] (box_format "
                    f"{box_format!r}), so its stages take boxes in that form only: write each "
                    f"coordinate x as round(1000·x), at most 999",
                )
        return boxes

    def read_stage_data(self, model, datasets, tokenizer) -> None:
        """Digits from the tokenizer; the box forms of the samples read; the vocabulary from those with no box."""
        bridge = object_bridge(model)
        digits = digit_tokens(tokenizer, bridge.box_format)
        self.tokenizer = tokenizer
        rows = []
        for sample in answer_samples(datasets, self.samples):
            if not self.integer_boxes(list(sample["labels"]), sample["where"], bridge.box_format):
                rows.append(sample["labels"])
        words = choose_vocabulary(rows, tokenizer, len(bridge.word_ids), self.min_count, self.max_share, self.exclude)
        words = reading_order(rows, tokenizer, words)
        bridge.set_vocabulary(words, digits, box_template(tokenizer, bridge.box_format, digits))

    def forward(self, model, batch: dict, normalizer: float | None = None) -> LossOutput:
        bridge = object_bridge(model)
        if self.tokenizer is None:
            raise RuntimeError("objective objects: read_stage_data was not called (the trainer calls it)")
        input_ids, labels = batch["input_ids"], batch["labels"]
        per_row = (input_ids == model.image_token_id).sum(1) // bridge.num_tokens
        if bool((per_row > 1).any()) or int(per_row.sum()) != batch["pixel_values"].shape[0]:
            raise ValueError("objective objects: every sample must hold at most one image")
        keep = per_row > 0
        labels = labels[keep]
        # per sample, from its source's `boxes_all_objects` (absent: off)
        all_objects = batch.get("boxes_all_objects", torch.zeros_like(keep)).to(keep.device, torch.bool)[keep]
        names = [str(i) for i, k in zip(batch.get("ids", range(len(keep))), keep.tolist()) if k]
        m = bridge.maps(model.vision_features(batch["pixel_values"]))
        n, rows, cols = m["objectness"].shape
        found = [self.integer_boxes(row, name, bridge.box_format) for row, name in zip(labels.tolist(), names)]
        box_row = torch.tensor([r for r, bs in enumerate(found) for _ in bs], dtype=torch.long, device=labels.device)
        boxes = torch.tensor([b.box for bs in found for b in bs], dtype=torch.long, device=labels.device).reshape(-1, 4)
        has_box = torch.zeros(n, dtype=torch.bool, device=labels.device)
        has_box[box_row] = True
        logs, loss = {}, m["objectness"].new_zeros(())
        if len(box_row):
            target = boxes.to(m["boxes"].dtype) / 1000
            centre = (target[:, :2] + target[:, 2:]) / 2
            c = (centre[:, 0] * cols).long().clamp(0, cols - 1)
            r = (centre[:, 1] * rows).long().clamp(0, rows - 1)
            obj = torch.zeros_like(m["objectness"])
            obj[box_row, r, c] = 1.0
            # the box cells, and every cell of a sample whose boxes are all its image's objects
            counted = obj.bool() | (has_box & all_objects)[:, None, None]
            l_obj = F.binary_cross_entropy_with_logits(
                m["objectness"], obj, reduction="none", pos_weight=obj.new_tensor(self.positive_weight)
            )[counted].mean()
            pred = m["boxes"][box_row, r, c]
            iou = box_iou(pred, target)
            l_box = self.box_weight * F.l1_loss(pred, target) + (1 - iou).mean()
            loss = loss + l_obj + l_box
            logs.update(objectness=l_obj.detach(), box=l_box.detach())
            metrics = {"box_iou": iou.mean().detach()}
        else:
            metrics = {}
        words = ~has_box
        if bool(words.any()):
            objectness = m["objectness"][words].detach()
            cells = bridge.peaks(objectness)
            emb = bridge.at(cells, m["embed"][words])
            present = bridge.at(cells, objectness) > 0
            present[:, 0] |= ~present.any(1)  # at least the best cell
            scores = bridge.scores(emb, model.lm.get_input_embeddings().weight)
            scores = scores.masked_fill(~present[..., None], float("-inf")).amax(1)
            target = (labels[words][:, :, None] == bridge.word_ids).any(1).to(scores.dtype)
            l_words = F.binary_cross_entropy_with_logits(scores, target)
            loss = loss + self.word_weight * l_words
            logs["words"] = l_words.detach()
            metrics["word_accuracy"] = ((scores > 0) == target.bool()).float().mean().detach()
        share = 1.0 if normalizer is None else target_total(batch) / normalizer
        return LossOutput(loss * share, {k: v * share for k, v in logs.items()}, metrics)
