"""The multimodal-LM task: LLaVA-format sources (JSON, JSONL, shards, HF datasets) → conversations, and interleaved
(MMC4-style) sources → documents, mixed → (packed) micro-batches."""

from __future__ import annotations

import numpy as np
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader

from mmbridge.config import StageConfig
from mmbridge.data.dataset import Collator, ConversationDataset, LengthGroupedBatches, MixtureSampler
from mmbridge.data.interleaved import InterleavedDataset
from mmbridge.data.packing import PackedBatches, PackingCollator, RowTagged, rows_per_epoch
from mmbridge.data.sources import resolve_source
from mmbridge.models.mma import mma_settings
from mmbridge.models.moe import moe_settings
from mmbridge.models.resolution import sync_processor
from mmbridge.train.signals import ignore_signals
from mmbridge.train.spec import TRAIN_SPECS, TrainSpec
from mmbridge.train.task import Task


class LMMTask(Task):
    """Vision encoder → bridge → causal LM, from `recipe.model`; batches from the stage's mixture."""

    kind = "lmm"

    def build(self):
        from mmbridge.models.build import build_model

        self.model, self.processor = build_model(self.recipe.model)
        self.datasets: dict[tuple, ConversationDataset | InterleavedDataset] = {}
        return self.model, self.processor.tokenizer

    def dataset(self, name: str) -> ConversationDataset | InterleavedDataset:
        # a stage may change the image tokens (its resolution): lengths are indexed per setting
        key = (
            name,
            self.processor.num_image_tokens,
            self.processor.max_length,
            self.processor.image_size,
            self.processor.tiling.key,
        )
        if key not in self.datasets:
            src = resolve_source(self.recipe, name)
            skip, lines = self.recipe.bad_samples == "skip", True if src.jsonl else None
            if src.interleaved:  # MMC4-style documents: raw text with images, laid out by recipe.sequence
                ds = InterleavedDataset(
                    src.jsonl or src.shards,
                    src.images,
                    self.processor,
                    self.recipe.sequence,
                    seed=self.recipe.seed,
                    skip_bad=skip,
                    lines=lines,
                )
            elif src.hf_dataset:  # a `datasets` dataset, rows read as LLaVA records
                from mmbridge.data.hf_source import HFRecords

                records = HFRecords(
                    src.hf_dataset, src.conversations, src.messages, src.images, src.split, src.image_root
                )
                ds = ConversationDataset(
                    records.name,
                    src.image_root,
                    self.processor,
                    skip_bad=skip,
                    records=records,
                    boxes_all_objects=src.boxes_all_objects,
                )
            else:
                ds = ConversationDataset(
                    src.json or src.jsonl or src.shards,
                    src.images,
                    self.processor,
                    skip_bad=skip,
                    lines=lines,
                    boxes_all_objects=src.boxes_all_objects,
                )
            self.skipped.update({f"{name}: {k}": v for k, v in ds.skipped.items()})
            if ds.truncated:
                print(f"{name}: {ds.truncated} sample(s) shortened in their trailing text to max_length")
            self.datasets[key] = ds
        return self.datasets[key]

    def batches(self, model, stage: StageConfig, start_batch: int, pin_memory: bool = False, fixed_width: bool = False):
        """Micro-batches of the whole (global) stream from micro-batch `start_batch`, and the epoch size."""
        names = list(stage.data)
        parts = [self.dataset(n) for n in names]
        mix = {"sizes": [len(p) for p in parts], "weights": [stage.data[n] for n in names], "seed": stage.seed}
        dataset, collate, n_samples = ConcatDataset(parts), Collator(self.processor), sum(len(p) for p in parts)
        if stage.pack:  # batch_size counts rows of max_length tokens; `epochs` counts the rows the data fills
            if not getattr(model.bridge, "packable", True):
                raise ValueError(
                    f"stage {stage.name!r}: pack is not supported with the {type(model.bridge).__name__} bridge"
                )
            lengths = np.concatenate([p.lengths for p in parts])
            images = np.concatenate([p.n_images for p in parts])
            budget = self.processor.max_length
            batches = PackedBatches(
                lengths, images, mix, stage.batch_size, budget, stage.pack_images, start=start_batch
            )
            collate = PackingCollator(self.processor, width=budget if fixed_width else None)
            dataset, n_samples = RowTagged(dataset), rows_per_epoch(lengths, budget)
        elif stage.group_by_length:
            lengths = np.concatenate([p.lengths for p in parts])
            batches = LengthGroupedBatches(
                lengths, mix, stage.batch_size, window=stage.group_by_length, start=start_batch
            )
        else:
            batches = BatchSampler(
                MixtureSampler(**mix, start=start_batch * stage.batch_size), stage.batch_size, drop_last=True
            )
        workers = self.recipe.num_workers
        loader = DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=workers,
            worker_init_fn=ignore_signals if workers else None,
            pin_memory=pin_memory,
        )
        return loader, n_samples

    def loader(self, model, stage: StageConfig, start_batch: int, dist):
        if not dist.main:  # the first process indexes the sources; the others then find its cache
            dist.barrier()
        for name in stage.data:
            self.dataset(name)
        if dist.main:
            dist.barrier()
        # on a GPU packed rows are padded to max_length: one shape, so flex_attention's kernel compiles once
        gpu = dist.device.type == "cuda"
        loader, n_samples = self.batches(model, stage, start_batch, pin_memory=gpu, fixed_width=gpu)
        return dist.shard_loader(loader), n_samples

    def prepare_stage(self, model, stage: StageConfig) -> None:
        """The stage's resolution (called before its train modes: a new position table trains if the vision
        does), and the processor in step with the model."""
        if stage.image_size and stage.image_size != model.vision.image_size:
            model.set_image_size(stage.image_size)
        sync_processor(model, self.processor)

    def bind_objective(self, model, stage: StageConfig, objective) -> None:
        """What the objective reads of the stage's data (the `concepts`, `objects` and `lexical` vocabularies)."""
        if hasattr(objective, "read_stage_data"):
            objective.read_stage_data(model, [self.dataset(n) for n in stage.data], self.processor.tokenizer)

    def after_load(self, model) -> None:
        sync_processor(model, self.processor)

    def run_meta(self, model) -> dict:
        """What `load_run` needs to rebuild the model's structure: MoE layers, LaVIN adapters, the resolution."""
        return {
            "moe": moe_settings(model.lm),
            "mma": mma_settings(model.lm, model.vision),
            "image_size": getattr(model.vision, "image_size", None),
        }


@TRAIN_SPECS.register("lmm")
def lmm_spec(recipe) -> TrainSpec:
    return LMMTask(recipe).spec()
