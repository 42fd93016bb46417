"""BLIP-2's stage-1 objectives on the Q-Former alone (no LM): ITC, ITM with hard negatives, ITG.

Captions are the first assistant reply of each record, in the Q-Former's own tokens
(`batch["caption_ids"]`, added by the collator when the bridge has a tokenizer). Each objective
runs the Q-Former with its own self-attention mask (see `qformer_mask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.loss_norm import target_total
from mmbridge.models.bridges.qformer import QFormerBridge
from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective

LOSSES = ("itc", "itm", "itg")


@OBJECTIVES.register("blip2")
class Blip2Stage1(Objective):
    """Image-text contrastive + matching + image-grounded generation (BLIP-2, stage 1).

    The projection heads, ITM head, text LM head and temperature are the stage's own parameters
    (`lr.objective`); the LM head's output layer is tied to the Q-Former's word embeddings.
    """

    def __init__(
        self, model: nn.Module, embed_dim: int = 256, losses: list | tuple = LOSSES, temperature: float = 0.07
    ):
        super().__init__(model)
        if not isinstance(model.bridge, QFormerBridge) or model.bridge.tokenizer is None:
            raise ValueError("objective blip2 needs the qformer bridge with a tokenizer (init or tokenizer)")
        unknown = set(losses) - set(LOSSES)
        if unknown or not losses:
            raise ValueError(f"objective blip2: losses must be some of {LOSSES}, got {list(losses)}")
        self.losses = tuple(losses)
        qf = model.bridge.qformer
        h = qf.hidden
        self.vision_proj, self.text_proj = nn.Linear(h, embed_dim), nn.Linear(h, embed_dim)
        self.itm_head = nn.Linear(h, 2)
        self.temp = nn.Parameter(torch.tensor(float(temperature)))
        self.lm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=qf.eps))
        self.lm_bias = nn.Parameter(torch.zeros(qf.word.num_embeddings))

    def forward(self, model, batch: dict, normalizer: float) -> LossOutput:
        qf, pad = model.bridge.qformer, model.bridge.pad_id
        text = batch.get("caption_ids")
        if text is None:
            raise ValueError("objective blip2: the batch has no caption_ids (is the bridge a qformer?)")
        feats = model.vision_features(batch["pixel_values"])
        if feats.shape[0] != text.shape[0]:
            raise ValueError(
                f"objective blip2 needs one image per sample: {feats.shape[0]} images, {text.shape[0]} captions"
            )
        text_mask = text != pad
        terms = {}
        sim, same = None, None
        if "itc" in self.losses or "itm" in self.losses:
            sim, same, terms["itc"] = self.contrastive(qf, feats, text, text_mask)
        if "itm" in self.losses:
            terms["itm"] = self.matching(qf, feats, text, text_mask, sim.detach(), same)
        if "itg" in self.losses:
            terms["itg"] = self.generation(qf, feats, text, text_mask)
        loss = sum(terms[k] for k in self.losses)
        # the trainer sums micro-batch losses: weight this one by its share of the step's targets
        share = target_total(batch) / max(normalizer, 1)
        return LossOutput(loss * share, {k: terms[k].detach() for k in self.losses})

    def contrastive(self, qf, feats, text, text_mask):
        """Max over queries of query·[CLS] similarity; identical captions count as positives."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        queries, words = qf(feats, text, text_mask, kind="itc")
        img = F.normalize(self.vision_proj(queries), dim=-1)  # [B, N, E]
        txt = F.normalize(self.text_proj(words[:, 0]), dim=-1)  # [B, E]
        sim = torch.einsum("ine,je->nij", img, txt).amax(0) / self.temp  # [B images, B texts]
        same = (text[:, None] == text[None, :]).all(-1)
        targets = same.float() / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(sim, targets) + F.cross_entropy(sim.t(), targets.t())) / 2
        return sim, same, loss

    def matching(self, qf, feats, text, text_mask, sim, same):
        """Binary match on query outputs (all see all), with negatives drawn ∝ exp(similarity)."""
        b = text.shape[0]
        if b < 2:
            raise ValueError("objective blip2: ITM needs at least 2 samples per batch")
        off_diag = ~torch.eye(b, dtype=torch.bool, device=sim.device)
        weights = sim.softmax(1).masked_fill(same, 0.0)
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, off_diag.float())
        neg_text = torch.multinomial(weights, 1).squeeze(1)  # a hard negative caption per image
        weights_t = sim.t().softmax(1).masked_fill(same, 0.0)
        weights_t = torch.where(weights_t.sum(1, keepdim=True) > 0, weights_t, off_diag.float())
        neg_image = torch.multinomial(weights_t, 1).squeeze(1)  # a hard negative image per caption
        idx = torch.arange(b, device=text.device)
        images = feats[torch.cat([idx, neg_image, idx])]
        texts = text[torch.cat([idx, idx, neg_text])]
        masks = text_mask[torch.cat([idx, idx, neg_text])]
        queries, _ = qf(images, texts, masks, kind="itm")
        logits = self.itm_head(queries).mean(1)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return F.cross_entropy(logits, labels)

    def generation(self, qf, feats, text, text_mask):
        """Caption tokens predicted from the queries and earlier text (the first token starts it)."""
        _, words = qf(feats, text, text_mask, kind="itg")
        logits = F.linear(self.lm_transform(words[:, :-1]), qf.word.weight, self.lm_bias)
        targets = text[:, 1:].masked_fill(~text_mask[:, 1:], -100)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
