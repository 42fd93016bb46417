"""The staged training loop: each stage starts from the previous stage's weights."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader
from tqdm.auto import tqdm

from mmbridge.config import Recipe, StageConfig
from mmbridge.data.dataset import Collator, ConversationDataset, LengthGroupedBatches, MixtureSampler
from mmbridge.data.sources import resolve_source
from mmbridge.models.build import build_model
from mmbridge.objectives import build_objective
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.parts import apply_stage_modes, count_params, param_groups, trainable_keys
from mmbridge.train.plots import plot_losses
from mmbridge.train.schedule import warmup_cosine


class Trainer:
    """Runs a recipe's stages in order, writing checkpoints, metrics and plots to `run_dir`."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, resume: bool = False, progress: bool = True):
        self.recipe, self.run_dir, self.progress = recipe, Path(run_dir), progress
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        torch.manual_seed(recipe.seed)
        self.model, self.processor = build_model(recipe.model)
        self.trained: set[str] = set()
        self.lora: dict | None = None
        self.state = {"stage": 0, "step": 0}
        self.datasets: dict[str, ConversationDataset] = {}
        self.skipped: Counter = Counter()
        last = self.run_dir / "checkpoints" / "last"
        if resume and (last / "trainer_state.pt").exists():
            meta = ckpt.load_weights(self.model, last)
            self.state = ckpt.load_trainer_state(last)
            self.trained, self.lora = set(meta["keys"]), meta.get("lora")
        elif resume:
            print(f"--resume: no checkpoint in {last}; starting from the beginning")
        ckpt.save_recipe(recipe, self.run_dir)
        self.processor.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))

    # -- data ---------------------------------------------------------------------------------
    def dataset(self, name: str) -> ConversationDataset:
        if name not in self.datasets:
            src = resolve_source(self.recipe, name)
            ds = ConversationDataset(src.json, src.images, self.processor, skip_bad=self.recipe.bad_samples == "skip")
            self.skipped.update({f"{name}: {k}": v for k, v in ds.skipped.items()})
            if ds.truncated:
                print(f"{name}: {ds.truncated} sample(s) shortened in their trailing text to max_length")
            self.datasets[name] = ds
        return self.datasets[name]

    def loader(self, stage: StageConfig, start_batch: int) -> tuple[DataLoader, int]:
        """Micro-batches from the stage's mixture, starting at micro-batch `start_batch`."""
        names = list(stage.data)
        parts = [self.dataset(n) for n in names]
        mix = {"sizes": [len(p) for p in parts], "weights": [stage.data[n] for n in names], "seed": stage.seed}
        if stage.group_by_length:
            lengths = [len(s["input_ids"]) for p in parts for s in p.samples]
            batches = LengthGroupedBatches(lengths, mix, stage.batch_size, window=stage.group_by_length,
                                           start=start_batch)
        else:
            batches = BatchSampler(MixtureSampler(**mix, start=start_batch * stage.batch_size), stage.batch_size,
                                   drop_last=True)
        loader = DataLoader(ConcatDataset(parts), batch_sampler=batches, collate_fn=Collator(self.processor),
                            num_workers=self.recipe.num_workers)
        return loader, sum(len(p) for p in parts)

    # -- training -----------------------------------------------------------------------------
    def run(self) -> Path:
        for si, stage in enumerate(self.recipe.stages):
            if si < self.state["stage"]:
                continue
            self.train_stage(si, stage)
        if self.skipped:
            print("skipped samples: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.skipped.items())))
        return self.run_dir

    def _steps(self, stage: StageConfig, n_samples: int) -> int:
        if stage.epochs is not None:
            return max(1, math.ceil(stage.epochs * n_samples / (stage.batch_size * stage.grad_accum)))
        return stage.steps

    def train_stage(self, si: int, stage: StageConfig) -> None:
        model = self.model
        injected = apply_stage_modes(model, stage)
        self.lora = self.lora or injected
        self.trained |= trainable_keys(model)
        objective = build_objective(stage.objective, model)
        groups = param_groups(model, stage, objective)
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        start_step = self.state["step"] if self.state["stage"] == si else 0
        loader, n_samples = self.loader(stage, start_step * stage.grad_accum)
        total = self._steps(stage, n_samples)
        warmup = int(round(stage.warmup * total))
        peak = [g["lr"] for g in groups]
        if start_step:
            objective.load_state_dict(self.state["objective"])
            optimizer.load_state_dict(self.state["optimizer"])
            ckpt.set_rng_state(self.state["rng"])
        else:
            torch.manual_seed(stage.seed)
        trainable, params = count_params(model)
        print(f"stage {si + 1}/{len(self.recipe.stages)} {stage.name!r}: {total} steps, {n_samples} samples, "
              f"{trainable / 1e6:.2f}M of {params / 1e6:.1f}M parameters train "
              f"({', '.join(f'{k}={v}' for k, v in stage.train.items())})")
        log = open(self.run_dir / "metrics.jsonl", "a")
        batches = iter(loader)
        bar = tqdm(range(start_step, total), initial=start_step, total=total, desc=stage.name,
                   disable=not self.progress, dynamic_ncols=True)
        params_to_clip = [p for g in groups for p in g["params"]]
        for step in bar:
            for g, lr in zip(optimizer.param_groups, peak):
                g["lr"] = lr * warmup_cosine(step, total, warmup, stage.min_lr_ratio)
            t0 = time.perf_counter()
            micro = [self._next_batch(batches) for _ in range(stage.grad_accum)]
            t_data = time.perf_counter() - t0
            n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            loss_sum, tokens, terms = 0.0, 0, Counter()
            for b in micro:
                out = objective(model, b, normalizer=max(n_targets, 1))
                out.loss.backward()
                loss_sum += out.loss.item()
                terms.update(out.terms)
                tokens += int(b["attention_mask"].sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params_to_clip, stage.clip) if stage.clip else torch.tensor(0.0)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"stage {stage.name!r} step {step + 1}: non-finite gradient norm; "
                                         f"batch ids {[i for b in micro for i in b['ids']]}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            rec = {"stage": stage.name, "step": step + 1, "loss": round(loss_sum, 6), "grad_norm": float(grad_norm),
                   "tokens": tokens, "tok_per_s": round(tokens / dt, 1), "data_s": round(t_data, 4),
                   "step_s": round(dt, 4), **{f"loss_{k}": round(v, 6) for k, v in terms.items()},
                   **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}}
            if (step + 1) % self.recipe.log_every == 0 or step + 1 == total:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / dt:.0f}")
            self.state = {"stage": si, "step": step + 1}
            if self.recipe.save_every and (step + 1) % self.recipe.save_every == 0 and step + 1 < total:
                self.save_checkpoint(optimizer, stage=si, step=step + 1, objective=objective)
        bar.close()
        log.close()
        self.state = {"stage": si + 1, "step": 0}
        self.save_checkpoint(None, stage=si + 1, step=0)
        ckpt.save_weights(model, self.trained, self.run_dir / "model", self._meta(si + 1, 0))
        plot_losses(self.run_dir / "metrics.jsonl", stage.name, self.run_dir / f"loss_{si + 1}_{stage.name}.png")

    def _next_batch(self, batches) -> dict:
        while True:
            b = next(batches)
            self.skipped.update({f"batch: {k}": v for k, v in b["skipped"].items()})
            if not b.get("empty"):
                return b

    def _meta(self, stage: int, step: int) -> dict:
        return {"keys": sorted(self.trained), "lora": self.lora, "stage": stage, "step": step}

    def save_checkpoint(self, optimizer, stage: int, step: int, objective=None) -> None:
        """Weights plus what an exact mid-stage resume needs (optimizer, objective, RNG)."""
        folder = self.run_dir / "checkpoints" / "last"
        ckpt.save_weights(self.model, self.trained, folder, self._meta(stage, step))
        state = {"stage": stage, "step": step, "rng": ckpt.rng_state()}
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
            state["objective"] = objective.state_dict() if objective is not None else {}
        ckpt.save_trainer_state(folder, state)


def train(recipe: Recipe, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    return Trainer(recipe, run_dir, resume=resume, progress=progress).run()
