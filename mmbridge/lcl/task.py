"""LCL as a task of the training engine (`recipe.kind: lcl`): our ViT from scratch + a small LM on
interleaved documents; at the end the ViT is exported (`RUN/<export>/`) and the LM is discarded.

Everything else (stages, devices, DDP/FSDP, checkpoints and exact resume, signals, the non-finite
guard, metrics, MFU) is the engine's, as for every other kind. The loss is the `lcl` objective.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mmbridge.config import RecipeError, StageConfig
from mmbridge.lcl.data import Collator, EpochBatches, Sequences, ShardBatches, resolve_documents
from mmbridge.lcl.model import LCLModel, build_lm, build_tokenizer
from mmbridge.lcl.sequence import ImageCache, SequenceConfig, SpecialIds, build_sequence
from mmbridge.models.vit import LCLVisionTower, ViTConfig
from mmbridge.train.signals import ignore_signals
from mmbridge.train.spec import TRAIN_SPECS, TrainSpec
from mmbridge.train.task import Task


class LCLTask(Task):
    kind = "lcl"

    def build(self):
        recipe = self.recipe
        self.sequence = SequenceConfig(**{**(recipe.sequence or {}), "max_length": recipe.model.max_length})
        names = {name for st in recipe.stages for name in st.data}
        self.sources = {name: resolve_documents(recipe, name) for name in sorted(names)}
        lm_cfg = dict(recipe.model.lm) or {"tokenizer": "words"}
        spec = lm_cfg.get("tokenizer", "words")
        texts = None
        if spec == "words":  # a word vocabulary of every in-memory document
            if any(v and isinstance(v[0], str) for v in self.sources.values()):
                raise RecipeError("model.lm.tokenizer: words needs in-memory sources; name an HF tokenizer for shards")
            texts = [t for docs in self.sources.values() for d in docs for t in d.texts]
        self.tokenizer = build_tokenizer(spec, texts)
        torch.manual_seed(recipe.seed)
        lm = build_lm(lm_cfg, self.tokenizer)
        width = lm.get_input_embeddings().embedding_dim
        vision = {k: v for k, v in recipe.model.vision.items() if k != "name"}
        torch.manual_seed(recipe.seed)  # the ViT's init does not depend on the LM's vocabulary
        vit = LCLVisionTower(ViTConfig(**{**vision, "out_dim": width}))
        self.model = LCLModel(vit, lm, SpecialIds.of(self.tokenizer), precision=recipe.model.precision)
        return self.model, self.tokenizer

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _collator(self) -> Collator:
        c = self.model.vit.config
        return Collator(self.model.ids.pad, ImageCache(c.image_size, c.image_mean, c.image_std))

    def loader(self, model, stage: StageConfig, start_batch: int, dist):
        got = [self.sources[name] for name in stage.data]
        streams = [
            (u, bool(self.recipe.sources[n].pairs))
            for n, g in zip(stage.data, got)
            if g and isinstance(g[0], str)
            for u in g
        ]
        docs = [d for g in got if g and not isinstance(g[0], str) for d in g]
        if docs and streams:
            raise RecipeError(f"stage {stage.name!r}: an LCL stage reads either in-memory sources or shards, not both")
        if not docs and not streams:
            raise RecipeError(f"stage {stage.name!r}: its data holds no documents")
        if streams:

            def build(doc, rng):
                return build_sequence(doc, self.sequence, self.model.ids, self.model.n_patches, self._encode, rng)

            return ShardBatches(
                streams, build, self._collator(), stage.batch_size, stage.seed, dist.rank, dist.world, start=start_batch
            ), None
        dataset = Sequences(docs, self.sequence, self.model.ids, self.model.n_patches, self._encode, stage.seed)
        workers = self.recipe.num_workers
        loader = DataLoader(
            dataset,
            batch_sampler=EpochBatches(len(docs), stage.batch_size, stage.seed, start_batch),
            collate_fn=self._collator(),
            num_workers=workers,
            worker_init_fn=ignore_signals if workers else None,
            pin_memory=dist.device.type == "cuda",
        )
        return dist.shard_loader(loader), len(docs)

    def finish(self, trainer) -> None:
        vit = trainer.dist.part(trainer.model, "vit")  # under FSDP gathered from the shards (every rank calls)
        if trainer.dist.main:
            folder = trainer.run_dir / self.recipe.export
            vit.save_pretrained(folder)
            print(f"encoder exported to {folder}")
        trainer.dist.barrier()


@TRAIN_SPECS.register("lcl")
def lcl_spec(recipe) -> TrainSpec:
    return LCLTask(recipe).spec()
