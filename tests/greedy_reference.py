"""What an evaluation's predictions must be: the model's own greedy decoding of prompts laid out by hand.

The tests give each evaluation the batches it would form (one record per batch, or records without shared
images) and lay out the same batch here, so the two decodings run the same kernels on the same shapes and must
agree token for token on any processor."""

from __future__ import annotations

import torch

from mmbridge.eval.metrics import normalize_answer


def greedy_answers(
    model, proc, prompts: list[list[int]], pixels: torch.Tensor | None, max_new_tokens: int, **extra
) -> list[str]:
    """Left-pad `prompts` (token ids, images expanded) with the pad id, mask the padding, decode greedily."""
    width = max(map(len, prompts))
    ids = torch.tensor([[proc.pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.eval().generate(ids, mask, pixels, max_new_tokens, proc.stop_token_ids, **extra)
    return [proc.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def vqa_accuracy_by_hand(predictions: list[str], golds: list[str]) -> float:
    """One gold answer per question: the share of predictions equal to it after VQA normalisation."""
    assert predictions and len(predictions) == len(golds)
    return sum(normalize_answer(p) == normalize_answer(g) for p, g in zip(predictions, golds)) / len(golds)
