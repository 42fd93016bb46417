"""Next-token loss on assistant tokens (LLaVA's captioning / instruction objective)."""

from __future__ import annotations

from mmbridge.objectives.base import OBJECTIVES, LossOutput, Objective


@OBJECTIVES.register("lm")
class NextTokenLoss(Objective):
    """Cross-entropy on labelled (assistant) tokens, summed and divided by the step's target count."""

    def forward(self, model, batch: dict, normalizer: float) -> LossOutput:
        out = model(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            batch["labels"],
            normalizer=normalizer,
            instruction_ids=batch.get("instruction_ids"),
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
            target_weights=batch.get("target_weights"),
            frame_counts=batch.get("frame_counts"),
            visual_index=batch.get("visual_index"),
            view_sizes=batch.get("view_sizes"),
        )
        return LossOutput(out.loss, {"lm": out.loss.detach()})
