"""Croc's cross-modal comprehension objective (Croc: Pretraining Large Multimodal Models with
Cross-Modal Comprehension).

Per image a fresh random fraction of the visual tokens is replaced by vectors from a learnable
prompt-token pool (matched by L2 distance), the LM reads the sequence under mixed attention, and a
small head reconstructs the original (detached, L2-normalised) visual tokens from the LM's final
hidden states at the image positions. Loss = next-token loss + weight × SmoothL1(β).

The pool and the head belong to this objective, so they exist only during the stage that names it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmbridge.loss_norm import target_total
from mmbridge.models.masks import MODES, mixed_attention_mask
from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective
from mmbridge.objectives.matching import METHODS, check_capacity, match
from mmbridge.objectives.ragged import pad_by_image, select_within
from mmbridge.objectives.reconstruction import ReconstructionHead

TARGETS = ("all", "selected")
POOL_INITS = ("randn", "unit")


class UnnormalisedBridgeError(ValueError):
    """Croc's objective on a bridge whose outputs are not L2-normalised (model.bridge.l2_normalize)."""


def num_selected(num_tokens: int, ratio: float) -> int:
    """Visual tokens replaced per image: `ratio` × `num_tokens`, rounded half up, at least one."""
    return max(1, int(ratio * num_tokens + 0.5))


def select_tokens(n_images: int, num_tokens: int, ratio: float, device=None) -> torch.Tensor:
    """A fresh random subset of exactly `num_selected` token indices per image: [n_images, m], sorted."""
    m = num_selected(num_tokens, ratio)
    order = torch.rand(n_images, num_tokens, device=device).argsort(dim=1)
    return order[:, :m].sort(dim=1).values


@dataclass
class CrocInputs:
    """What the LM reads in a Croc step, plus what the loss needs."""

    embeds: torch.Tensor  # [B, T, width] LM input, selected visual tokens replaced by pool vectors
    mask: torch.Tensor  # [B, 1, T, T] additive mixed-attention mask
    is_image: torch.Tensor  # [B, T]
    visual: torch.Tensor | None  # [n_images, N, width] bridge outputs before replacement
    selected: torch.Tensor | None  # [n_images, m] replaced token indices
    assignment: torch.Tensor | None  # [n_images, m] pool row for each replaced token
    # images of their own counts (a tiling): `visual` is padded to the largest, `valid` [n_images, N] marks real
    # tokens and `used` [n_images, m] the selections that are real (the others index past every real token)
    valid: torch.Tensor | None = None
    used: torch.Tensor | None = None


@OBJECTIVES.register("croc")
class CrocObjective(Objective):
    """Prompt-pool replacement + mixed attention + visual-token reconstruction (Croc)."""

    def __init__(
        self,
        model,
        pool_size: int = 2048,
        mask_ratio: float = 0.75,
        matching: str = "hungarian",
        attention: str = "prefix",
        target: str = "all",
        recon_weight: float = 10.0,
        beta: float = 0.01,
        head_heads: int | None = None,
        pool_init: str = "randn",
        head: str = "bert",
        head_dropout: float = 0.1,
        allow_unnormalised: bool = False,
    ):
        """`pool_init`: `randn` rows ~ N(0, 1) (norm about √width, as Croc's code) or `unit` (unit rows, the
        scale of the normalised visual tokens they replace). `head`: `bert` (Croc's post-LN BERT-style layer,
        dropout `head_dropout`) or `pre_ln` (a pre-LN layer, a final LayerNorm, no dropout). The bridge must
        L2-normalise its outputs (UnnormalisedBridgeError otherwise) unless `allow_unnormalised`."""
        super().__init__(model)
        if not allow_unnormalised and not getattr(model.bridge, "l2_normalize", False):
            raise UnnormalisedBridgeError(
                "objective croc: the bridge does not L2-normalise its outputs; set model.bridge.l2_normalize: true "
                "(Croc normalises them in every stage; its targets and pool assume unit tokens), or "
                "allow_unnormalised: true"
            )
        if pool_init not in POOL_INITS:
            raise ValueError(f"pool_init {pool_init!r}: expected one of {POOL_INITS}")
        if matching not in METHODS:
            raise ValueError(f"matching {matching!r}: expected one of {METHODS}")
        if attention not in MODES:
            raise ValueError(f"attention {attention!r}: expected one of {MODES}")
        if target not in TARGETS:
            raise ValueError(f"target {target!r}: expected one of {TARGETS}")
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        self.num_tokens = getattr(model, "max_image_tokens", model.num_image_tokens)  # the most one image takes
        m = num_selected(self.num_tokens, mask_ratio)
        if matching == "hungarian":
            check_capacity(m, pool_size)  # fail when the recipe is read, not at the first step
        width = model.lm.get_input_embeddings().embedding_dim
        self.mask_ratio, self.matching, self.attention, self.target = mask_ratio, matching, attention, target
        self.recon_weight, self.beta = recon_weight, beta
        rows = torch.randn(pool_size, width)
        self.pool = nn.Parameter(rows if pool_init == "randn" else F.normalize(rows, dim=-1))
        self.head = ReconstructionHead(width, self.num_tokens, width, head_heads, head, head_dropout)
        self.timings: dict[str, float] = {}  # seconds spent in matching and mask building, last call

    def prepare(self, model, batch: dict) -> CrocInputs:
        """Encode the images, replace the selected tokens by their matched pool vectors, build the mask."""
        ids = batch["input_ids"]
        is_image = ids == model.image_token_id
        pixels = batch.get("pixel_values")
        visual = selected = assignment = None
        t_match = 0.0
        if batch.get("image_counts") is not None:
            return self._prepare_ragged(model, batch)
        if pixels is not None and pixels.numel():
            visual = model.encode_images(pixels)
            n, k, width = visual.shape
            selected = select_tokens(n, k, self.mask_ratio, visual.device)
            index = selected.unsqueeze(-1).expand(-1, -1, width)
            t0 = time.perf_counter()
            assignment = match(F.normalize(visual.gather(1, index).detach(), dim=-1), self.pool, self.matching)
            t_match = time.perf_counter() - t0
            prompts = self.pool[assignment].to(visual.dtype)  # gradients reach exactly these rows
            mixed = visual.scatter(1, index, prompts)
            embeds = model.embed(ids, visual=mixed)
        else:
            embeds = model.embed(ids, None)
        t0 = time.perf_counter()
        mask = mixed_attention_mask(
            batch["attention_mask"],
            self.attention,
            batch.get("labels"),
            is_image,
            self.num_tokens,
            dtype=embeds.dtype,
            segment_ids=batch.get("segment_ids"),
        )
        self.timings = {"matching": t_match, "mask": time.perf_counter() - t0}
        return CrocInputs(embeds, mask, is_image, visual, selected, assignment)

    def _prepare_ragged(self, model, batch: dict) -> CrocInputs:
        """`prepare` for images of their own token counts (`image_counts`, `visual_index`: a tiling): each image
        has `mask_ratio` of its own tokens replaced, matched within the image."""
        ids, counts = batch["input_ids"], batch["image_counts"]
        is_image = ids == model.image_token_id
        pixels, t_match = batch.get("pixel_values"), 0.0
        visual = selected = assignment = valid = used = None
        if pixels is not None and pixels.numel() and len(counts):
            views = model.encode_images(pixels, view_sizes=batch.get("view_sizes"))
            flat = model.place_visual(views, batch.get("visual_index"))
            counts = counts.to(flat.device)
            visual, valid = pad_by_image(flat, counts, extra=1)  # one spare column: unused selections land there
            selected, used = select_within(counts, self.mask_ratio)
            index = selected.unsqueeze(-1).expand(-1, -1, flat.shape[-1])
            t0 = time.perf_counter()
            assignment = match(F.normalize(visual.gather(1, index).detach(), dim=-1), self.pool, self.matching, used)
            t_match = time.perf_counter() - t0
            prompts = self.pool[assignment].to(visual.dtype)
            mixed = visual.scatter(1, index, torch.where(used.unsqueeze(-1), prompts, visual.gather(1, index)))
            visual, valid = visual[:, :-1], valid[:, :-1]
            embeds = model.embed(ids, visual=mixed[:, :-1][valid].unsqueeze(0))
        else:
            embeds = model.embed(ids, None)
        t0 = time.perf_counter()
        mask = mixed_attention_mask(
            batch["attention_mask"],
            self.attention,
            batch.get("labels"),
            is_image,
            counts,
            dtype=embeds.dtype,
            segment_ids=batch.get("segment_ids"),
        )
        self.timings = {"matching": t_match, "mask": time.perf_counter() - t0}
        return CrocInputs(embeds, mask, is_image, visual, selected, assignment, valid, used)

    def reconstruction_loss(self, hidden: torch.Tensor, inputs: CrocInputs) -> torch.Tensor:
        """SmoothL1 between the head's predictions and the detached, L2-normalised bridge outputs."""
        if inputs.valid is not None:
            return self._ragged_loss(hidden, inputs)
        n, k, width = inputs.visual.shape
        pred = self.head(hidden[inputs.is_image].view(n, k, -1).to(self.pool.dtype))
        target = F.normalize(inputs.visual.detach().float(), dim=-1)
        if self.target == "selected":
            index = inputs.selected.unsqueeze(-1).expand(-1, -1, width)
            pred, target = pred.gather(1, index), target.gather(1, index)
        return F.smooth_l1_loss(pred.float(), target, beta=self.beta)

    def _ragged_loss(self, hidden: torch.Tensor, inputs: CrocInputs) -> torch.Tensor:
        """The loss over each image's own tokens (or its real selections), padding left out of the mean."""
        width = inputs.visual.shape[-1]
        states, _ = pad_by_image(hidden[inputs.is_image], inputs.valid.sum(1))
        pred = self.head(states.to(self.pool.dtype), inputs.valid)
        target = F.normalize(inputs.visual.detach().float(), dim=-1)
        if self.target == "selected":
            index = inputs.selected.clamp(max=inputs.visual.shape[1] - 1).unsqueeze(-1).expand(-1, -1, width)
            return F.smooth_l1_loss(
                pred.gather(1, index)[inputs.used].float(), target.gather(1, index)[inputs.used], beta=self.beta
            )
        return F.smooth_l1_loss(pred[inputs.valid].float(), target[inputs.valid], beta=self.beta)

    def forward(self, model, batch: dict, normalizer: float | None = None) -> LossOutput:
        inputs = self.prepare(model, batch)
        hidden = model.lm.get_decoder()(
            inputs_embeds=inputs.embeds,
            attention_mask=inputs.mask,
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
        lm_loss, n_targets = model.target_loss(hidden, batch["labels"], normalizer, batch.get("target_weights"))
        if inputs.visual is None:
            return LossOutput(lm_loss, {"lm": lm_loss.detach(), "recon": 0.0})
        # the reconstruction term is a per-micro-batch mean; weighting it by this micro-batch's share
        # of the step's target tokens makes the accumulated sum a mean again (exactly 1 without accumulation)
        share = 1.0 if normalizer is None else target_total(batch) / normalizer
        recon = self.recon_weight * share * self.reconstruction_loss(hidden, inputs)
        return LossOutput(lm_loss + recon, {"lm": lm_loss.detach(), "recon": recon.detach()})
