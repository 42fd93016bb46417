"""The `concepts` objective: word detectors learned from captions by multiple-instance learning.

For a stage whose bridge reads out concept tokens (`model.bridge.concepts`, bridges/concepts.py): every
sample's target is the set of vocabulary words among its answer tokens; an image's score for a word is its
best region's (max over the bridge's tokens, the MIL rule of Fang et al. 2015), trained with binary
cross-entropy against that set. The LM only lends its word embeddings: it runs no forward pass, so a step
costs the encoder (nothing with `model.feature_cache` after the first epoch) and the bridge.

`read_stage_data` chooses the vocabulary once, from the stage's own data: the `words` token ids that occur in the
most samples' answers, among whole alphabetic words of at least two letters that occur in at least
`min_count` samples and in at most `max_share` of them (words in nearly every answer, such as "the", say
nothing about the image).

Assumed: a sample's answers describe its image(s) (a sample with several images credits each word to its best
one), and the words worth detecting are single tokens of the stage's own answers. The bridge is then a word
bottleneck over that vocabulary (bridges/concepts.py), not a continuous bridge.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from mmbridge.data.processor import IGNORE
from mmbridge.loss_norm import target_total
from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective


def concept_bridge(model):
    bridge = getattr(model, "bridge", None)
    if not getattr(bridge, "reads_words", False):
        raise ValueError(
            "objective concepts: the model's bridge has no concept read-out; set "
            "model.bridge.concepts: {words: N, slots: K}"
        )
    return bridge


def choose_vocabulary(
    label_rows, tokenizer, words: int, min_count: int = 3, max_share: float = 0.9, exclude=(), at_most: bool = False
) -> list[int]:
    """The `words` (with `at_most`: up to `words`) most frequent eligible answer tokens of `label_rows` (each a sequence of label ids): words
    of two letters or more, in at least `min_count` answers and at most a `max_share` of them, and not among
    `exclude` (case-insensitive)."""
    skip = {w.strip().lower() for w in exclude}
    df, n = Counter(), 0
    for labels in label_rows:
        df.update({int(t) for t in labels if t != IGNORE})
        n += 1
    if not n:
        raise ValueError("objective concepts: the stage has no samples to choose a vocabulary from")

    def eligible(tok: int, count: int) -> bool:
        text = tokenizer.decode([tok]).strip()
        return len(text) >= 2 and text.isalpha() and min_count <= count <= max_share * n and text.lower() not in skip

    ranked = sorted(((c, t) for t, c in df.items() if eligible(t, c)), key=lambda x: (-x[0], x[1]))
    if len(ranked) < words and not (at_most and ranked):
        raise ValueError(
            f"objective concepts: only {len(ranked)} eligible words in the stage's answers "
            f"({n} samples), {words} asked (model.bridge.concepts.words)"
        )
    return [t for _, t in ranked[:words]]


def answer_samples(datasets, samples: int):
    """Up to `samples` of the datasets' samples (as `encoded` gives them), spread evenly over their concatenation."""
    sizes = [len(d) for d in datasets]
    total = sum(sizes)
    picks = np.unique(np.linspace(0, total - 1, min(samples, total)).astype(np.int64)) if total else []
    starts = np.cumsum([0, *sizes])
    for i in picks:
        d = int(np.searchsorted(starts, i, side="right") - 1)
        yield datasets[d].encoded(int(i - starts[d]))


def answer_rows(datasets, samples: int):
    """The label rows of `answer_samples`."""
    for sample in answer_samples(datasets, samples):
        yield sample["labels"]


def image_rows(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int, image_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """[n_images]: the row of `input_ids` each image belongs to; a row's images fill its image tokens in order,
    `tokens_per_image` each, or, under a tiling whose counts vary, `image_counts` [n_images] each."""
    is_image = input_ids == image_token_id
    if image_counts is None:
        per_row = is_image.sum(1) // tokens_per_image
        return torch.repeat_interleave(torch.arange(len(per_row), device=per_row.device), per_row)
    slot_row = torch.nonzero(is_image)[:, 0]  # row-major: the slots in the order the images fill them
    if int(image_counts.sum()) != slot_row.numel():
        raise ValueError(f"{int(image_counts.sum())} image tokens counted for {slot_row.numel()} in the batch")
    return slot_row[torch.cumsum(image_counts, 0) - image_counts]


def images_per_row(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int, image_counts: torch.Tensor | None = None
) -> torch.Tensor:
    """How many images each row of `input_ids` holds (see `image_rows`)."""
    owner = image_rows(input_ids, image_token_id, tokens_per_image, image_counts)
    return torch.bincount(owner, minlength=input_ids.shape[0])


def word_mil(
    per_token: torch.Tensor,
    batch: dict,
    image_token_id: int,
    tokens_per_image: int,
    word_ids: torch.Tensor,
    normalizer: float | None,
    name: str,
    image_counts: torch.Tensor | None = None,
):
    """Multiple-instance word detection: a row holds a word if one of its images' tokens does (the largest logit of
    `per_token` [n_images, tokens, V] over the row's images' tokens), binary cross-entropy against the words
    `word_ids` among the row's labels. Returns the loss, its share of the step's normaliser, and the accuracy.
    `image_counts`: each image's image tokens where they vary (a tiling; see `image_rows`)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    per_image = per_token.amax(1)
    # each image belongs to the row whose image tokens it fills (in order)
    owner = image_rows(input_ids, image_token_id, tokens_per_image, image_counts)
    if owner.numel() != per_image.shape[0]:
        raise ValueError(f"objective {name}: {per_image.shape[0]} images for {owner.numel()} image slots")
    scores = per_image.new_full((input_ids.shape[0], per_image.shape[1]), float("-inf"))
    scores = scores.scatter_reduce(0, owner[:, None].expand_as(per_image), per_image, "amax")
    has = torch.bincount(owner, minlength=input_ids.shape[0]) > 0
    target = (labels[:, :, None] == word_ids[None, None, :]).any(1).to(scores.dtype)
    loss = F.binary_cross_entropy_with_logits(scores[has], target[has])
    share = 1.0 if normalizer is None else target_total(batch) / normalizer
    hit = ((scores[has] > 0) == target[has].bool()).float().mean()
    return loss, share, hit


@OBJECTIVES.register("concepts")
class ConceptLoss(Objective):
    """Multiple-instance word detection on the bridge's tokens; `samples`: how many of the stage's samples
    (spread evenly) choose the vocabulary."""

    runs_lm = False  # the trainer counts the encoder's and bridge's FLOPs only

    def __init__(self, model, samples: int = 4000, min_count: int = 3, max_share: float = 0.9):
        super().__init__(model)
        concept_bridge(model)
        self.samples, self.min_count, self.max_share = samples, min_count, max_share

    def read_stage_data(self, model, datasets, tokenizer) -> None:
        """Choose the vocabulary from the stage's datasets (the same choice on every call and every rank)."""
        bridge = concept_bridge(model)
        rows = answer_rows(datasets, self.samples)
        bridge.set_vocabulary(choose_vocabulary(rows, tokenizer, len(bridge.word_ids), self.min_count, self.max_share))

    def forward(self, model, batch: dict, normalizer: float | None = None) -> LossOutput:
        bridge = concept_bridge(model)
        feats = model.vision_features(batch["pixel_values"])
        words = model.lm.get_input_embeddings().weight
        per_region = bridge.scores(bridge.regions_of(feats), words)  # [n_images, regions, V]
        loss, share, hit = word_mil(
            per_region, batch, model.image_token_id, bridge.num_tokens, bridge.word_ids, normalizer, "concepts"
        )
        return LossOutput(loss * share, {"concepts": (loss * share).detach()}, {"word_accuracy": hit.detach()})
