"""LCL's objective (latent compression learning): L = gen_weight · L_gen + λ · L_con.

L_gen: next-token cross-entropy on text targets (never on patch placeholders, `<eoi>` or padding),
summed and divided by the step's normaliser like every objective; its gradient reaches the ViT through
the patch tokens. L_con: symmetric InfoNCE between each image's latent and the projected LM state at
its `<soi>` (which has seen only the preceding context; an image at position 0 has none and is
skipped), over the images of every process, gathered with gradients. The projection and the
learnable temperature are this objective's parameters (`lr.objective`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.lcl.loss import ContrastiveHead
from mmbridge.lcl.sequence import IGNORE
from mmbridge.loss_norm import target_total
from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective


@OBJECTIVES.register("lcl")
class LatentCompression(Objective):
    def __init__(
        self,
        model: nn.Module,
        lambda_con: float = 0.1,
        gen_weight: float = 1.0,
        init_temperature: float = 0.07,
        max_scale: float = 100.0,
    ):
        super().__init__(model)
        if not hasattr(model, "soi_states"):
            raise ValueError("objective lcl needs the LCL model (a recipe of kind lcl)")
        self.lambda_con, self.gen_weight = lambda_con, gen_weight
        width = model.lm.get_input_embeddings().embedding_dim
        self.head = ContrastiveHead(width, model.vit.config.out_dim, 1 / init_temperature, max_scale)

    def forward(self, model, batch: dict, normalizer: float) -> LossOutput:
        ids, labels = batch["input_ids"], batch["labels"]
        h, latent = model.hidden(ids, batch["attention_mask"], batch["pixel_values"])
        targets = labels[:, 1:]
        keep = targets != IGNORE
        if self.gen_weight:
            logits = model.lm.get_output_embeddings()(h[:, :-1][keep])
            gen = F.cross_entropy(logits.float(), targets[keep], reduction="sum") / max(normalizer, 1e-12)
        else:
            gen = h.sum() * 0.0
        state, valid = model.soi_states(ids, h)
        if state.shape[0] != latent.shape[0]:
            raise ValueError(f"{state.shape[0]} <soi> tokens but {latent.shape[0]} images")
        con = self.head(latent, state, valid) if self.lambda_con else h.sum() * 0.0
        # L_con is a mean over this micro-batch's (gathered) images: weighted by the micro-batch's share of the
        # step's targets, the sum over micro-batches and the average over processes are a mean again
        share = target_total(batch) / max(normalizer, 1e-12)
        loss = self.gen_weight * gen + self.lambda_con * share * con
        return LossOutput(
            loss, {"gen": gen.detach(), "con": share * con.detach()}, {"logit_scale": self.head.scale.detach()}
        )

    @torch.no_grad()
    def text_features(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit contrastive features of text-only sequences ending in `<soi>` (retrieval's text side)."""
        embeds = model.lm.get_input_embeddings()(input_ids)
        h = model.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        state, _ = model.soi_states(input_ids, h)
        return F.normalize(self.head.proj(state).float(), dim=-1)
