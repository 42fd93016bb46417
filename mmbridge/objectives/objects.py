"""The `objects` objective: an object-token bridge's detector, from boxes and captions (bridges/objects.py).

Samples whose answers hold boxes ("[x0, y0, x1, y1]" in [0, 999], as grounding data writes them) are taken
to box every object of their image, as detection data does: the cell under each box centre is an object
(binary cross-entropy on every cell's objectness, object cells weighted `positive_weight`) and regresses its box there (L1 and 1 − IoU). Samples whose
answers hold no box (captions, descriptions) train the word detectors by multiple-instance learning: an image
holds a word if one of its objects does, its objects being the cells the bridge would pick and deems present
(`peaks` with positive objectness, at least the best one), scored with binary cross-entropy against the vocabulary words of the answers, as the `concepts`
objective does over regions. The LM only lends its word embeddings and runs no forward pass.

`read_stage_data` chooses the vocabulary from the stage's box-free answers and puts it in reading order (by
where each word tends to stand in its clause: "a large red circle is at the top left" gives size, colour, shape,
place), checks that the tokenizer writes
numbers digit by digit and tokenises the bridge's `box_format` (the bridge writes boxes with the LM's tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmbridge.data.processor import IGNORE
from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective
from mmbridge.objectives.concepts import answer_rows, choose_vocabulary
from mmbridge.train.loss_norm import target_total


def object_bridge(model):
    bridge = getattr(model, "bridge", None)
    if not hasattr(bridge, "peaks"):
        raise ValueError("objective objects: the model's bridge is not an object-token bridge; set "
                         "model.bridge: {name: objects, ...}")
    return bridge


def label_boxes(labels: torch.Tensor, digit_ids: torch.Tensor, open_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes written in answer tokens: `labels` [B, L] (IGNORE outside answers) → (row of each box [N],
    boxes [N, 4] as integers). A box is an opening token (one of `open_ids`: '[', ' [') followed by four digit runs; runs are numbers read
    digit by digit (the tokenizer's digit tokens `digit_ids`). Boxes out of order or over 999 are dropped."""
    b, length = labels.shape
    match = labels[..., None] == digit_ids
    is_digit = match.any(-1)
    digit = match.long().argmax(-1)
    prev = F.pad(is_digit[:, :-1], (1, 0), value=False)
    start = (is_digit & ~prev).flatten()
    flat_digit = is_digit.flatten()
    where = flat_digit.nonzero().squeeze(1)
    run_of = (start.long().cumsum(0) - 1)[where]
    starts = start.nonzero().squeeze(1)
    n = len(starts)
    empty = (labels.new_zeros(0), labels.new_zeros(0, 4))
    if n == 0:
        return empty
    size = torch.bincount(run_of, minlength=n)
    pos = torch.arange(len(where), device=labels.device) - (size.cumsum(0) - size)[run_of]
    place = torch.pow(10, size[run_of] - 1 - pos)
    value = torch.zeros(n, dtype=torch.long, device=labels.device).index_add_(0, run_of, digit.flatten()[where] * place)
    row, col = starts // length, starts % length
    before = labels.flatten()[(starts - 1).clamp(min=0)]
    opens = torch.as_tensor(open_ids, device=labels.device).reshape(-1)
    first = ((col > 0) & torch.isin(before, opens)).nonzero().squeeze(1)
    first = first[first + 3 < n]
    if len(first) == 0:
        return empty
    idx = first[:, None] + torch.arange(4, device=labels.device)
    boxes, rows = value[idx], row[idx]
    ok = (rows == rows[:, :1]).all(1) & (boxes <= 999).all(1) & (boxes[:, 0] <= boxes[:, 2]) & (boxes[:, 1] <= boxes[:, 3])
    return rows[ok, 0], boxes[ok]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of paired boxes [N, 4] (x0, y0, x1, y1)."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1) + (b[:, 2:] - b[:, :2]).prod(1)
    return inter / (area - inter).clamp(min=1e-6)


def single_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"objective objects: the tokenizer writes {text!r} as {len(ids)} tokens; the object "
                         f"bridge spells boxes digit by digit and needs one token per digit and for '['")
    return ids[0]


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

    def __init__(self, model, samples: int = 4000, min_count: int = 3, max_share: float = 0.9,
                 box_weight: float = 5.0, positive_weight: float = 10.0, word_weight: float = 3.0,
                 exclude: list[str] | tuple = ()):
        super().__init__(model)
        object_bridge(model)
        self.exclude = list(exclude)
        self.samples, self.min_count, self.max_share = samples, min_count, max_share
        self.box_weight, self.positive_weight, self.word_weight = box_weight, positive_weight, word_weight
        self.open_ids: list[int] | None = None

    def read_stage_data(self, model, datasets, tokenizer) -> None:
        """Digits and '[' from the tokenizer; the vocabulary from the answers that hold no box."""
        bridge = object_bridge(model)
        digits = [single_token(tokenizer, str(d)) for d in range(10)]
        self.open_ids = [single_token(tokenizer, "[")]
        spaced = tokenizer.encode(" [", add_special_tokens=False)
        self.open_ids += spaced if len(spaced) == 1 else []
        if tokenizer.encode("503", add_special_tokens=False) != [digits[5], digits[0], digits[3]]:
            raise ValueError("objective objects: the tokenizer does not write numbers digit by digit")
        digit_t = torch.tensor(digits)

        def box_free():
            for labels in answer_rows(datasets, self.samples):
                row = torch.as_tensor(labels)[None]
                if len(label_boxes(row, digit_t, self.open_ids)[0]) == 0:
                    yield labels

        rows = list(box_free())
        words = choose_vocabulary(rows, tokenizer, len(bridge.word_ids), self.min_count, self.max_share,
                                  self.exclude)
        words = reading_order(rows, tokenizer, words)
        bridge.set_vocabulary(words, digits, box_template(tokenizer, bridge.box_format, digits))

    def forward(self, model, batch: dict, normalizer: float | None = None) -> LossOutput:
        bridge = object_bridge(model)
        if self.open_ids is None:
            raise RuntimeError("objective objects: read_stage_data was not called (the trainer calls it)")
        input_ids, labels = batch["input_ids"], batch["labels"]
        per_row = (input_ids == model.image_token_id).sum(1) // bridge.num_tokens
        if bool((per_row > 1).any()) or int(per_row.sum()) != batch["pixel_values"].shape[0]:
            raise ValueError("objective objects: every sample must hold at most one image")
        labels = labels[per_row > 0]
        m = bridge.maps(model.vision_features(batch["pixel_values"]))
        n, rows, cols = m["objectness"].shape
        box_row, boxes = label_boxes(labels, bridge.digit_ids, self.open_ids)
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
            l_obj = F.binary_cross_entropy_with_logits(m["objectness"][has_box], obj[has_box],
                                                       pos_weight=obj.new_tensor(self.positive_weight))
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
