"""The training engine: a recipe's stages in order, each starting from the previous stage's weights.

One engine for every kind of training (`train/task.py` says what a kind supplies). Built to survive
long runs: a resumed run continues with the same data position, RNG (CPU, numpy, Python and every
CUDA device), optimizer and objective state, so its losses match an uninterrupted run's; SIGTERM or
SIGINT finish the step, write a checkpoint and return; a step with a non-finite loss or gradient is
skipped and counted, and `max_nonfinite_steps` in a row stop the run with a diagnostic. Checkpoint
files and their checks live in `train/checkpoint.py`.

The device is picked once (`train/device.py`); the model lives there and every micro-batch is moved
there after its token, target and FLOP counts are taken on the CPU, so a step reads the device back
once (loss, gradient norm and loss terms together), not once per micro-batch.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmbridge.config import Recipe, StageConfig, recipe_to_dict
from mmbridge.loss_norm import sample_weights, target_total
from mmbridge.models.resolution import sync_processor
from mmbridge.objectives import build_objective
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.device import allow_tf32
from mmbridge.train.distributed import Dist
from mmbridge.train.flops import device_peak
from mmbridge.train.parts import apply_stage_modes, count_params, param_groups, trainable_keys
from mmbridge.train.plots import plot_losses
from mmbridge.train.schedule import warmup_cosine
from mmbridge.train.signals import StopSignals
from mmbridge.train.tasks import task_for
from mmbridge.train.tracking import Trackers


class NonFiniteError(FloatingPointError):
    """Too many steps in a row with a non-finite loss or gradient; the message is the diagnostic."""


def _nonfinite_terms(loss: float, terms: dict) -> str:
    """Name the loss terms that are not finite (the total, if every term is)."""
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if bad:
        return "loss term " + ", ".join(f"{k!r} = {v}" for k, v in bad.items())
    return f"total loss {loss} (its terms {dict(terms)} are finite)"


def _first_nonfinite_grad(model: torch.nn.Module, objective: torch.nn.Module) -> str:
    named = [*model.named_parameters(), *(("objective." + n, p) for n, p in objective.named_parameters())]
    return next((n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()), "(none found)")


def _detached(v) -> torch.Tensor | float:
    return v.detach().float() if torch.is_tensor(v) else float(v)


class Trainer:
    """Runs a recipe's stages in order, writing checkpoints, metrics and plots to `run_dir`.

    The run directory is checked (writable, room for the checkpoints) before anything trains.
    """

    def __init__(self, recipe: Recipe, run_dir: str | Path, resume: bool = False, progress: bool = True):
        self.recipe, self.run_dir, self.progress = recipe, Path(run_dir), progress
        # one process unless started by torchrun with strategy ddp | fsdp; the device is picked here, once
        self.dist = Dist(recipe.strategy, recipe.device)
        self.say = print if self.dist.main else (lambda *a, **k: None)
        ckpt.check_run_dir(self.run_dir)
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        allow_tf32(self.dist.device, recipe.model.precision)
        torch.manual_seed(recipe.seed)
        self.task = task_for(recipe)
        with self.dist.building():  # FSDP: the pretrained parts on the meta device, each rank reads its shards
            model, self.tokenizer = self.task.build()
        model.precision = recipe.model.precision
        self.model = self.dist.place(model)
        self.objective = None  # the last stage's objective (its heads, e.g. LCL's contrastive projection)
        self.trained: set[str] = set()
        self.lora: dict | None = None
        self.state = {"stage": 0, "step": 0}
        self.skipped: Counter = Counter()
        self.nonfinite = 0  # steps skipped for a non-finite loss or gradient, whole run
        self.signals = StopSignals()  # SIGTERM/SIGINT during `run`
        self.stopped = False  # the run ended early on a signal, with a checkpoint to resume from
        self._consumed = 0  # loader batches taken this stage (the data position a resume skips to)
        self._metrics_bytes = 0  # length of metrics.jsonl at the last step, saved with checkpoints
        self._resume_from: Path | None = None  # the checkpoint being resumed
        self._steps_before = 0  # optimizer steps of the stages before this one: trackers count steps over the run
        self.trackers = Trackers(recipe.log, self.run_dir, recipe.name, recipe_to_dict(recipe), enabled=self.dist.main)
        if self.dist.main:
            ckpt.remove_partial(self.run_dir)
        self.dist.barrier()
        if resume:
            self._resume()
        elif self.dist.main and (aside := ckpt.set_aside(self.run_dir)) is not None:  # never resume another run
            print(
                f"{self.run_dir}: not resuming (no --resume): the earlier run's checkpoints folder ({aside[1]} "
                f"checkpoint(s)) was moved, whole, to {aside[0]}; nothing was deleted (remove it when no "
                "longer needed)"
            )
        ckpt.check_free_space(
            self.run_dir, *ckpt.estimate_checkpoint_bytes(self.model, recipe), recipe.keep_checkpoints
        )
        if self.dist.main:
            ckpt.save_recipe(recipe, self.run_dir)
            self.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        # peak FLOP/s of one device, for MFU (CPU: measured once, then cached; a GPU not in the table: None)
        self.peak = self.dist.broadcast(device_peak(self.dist.device)[0] if self.dist.main else None)
        self.dist.barrier()

    @property
    def processor(self):
        """The LMM task's processor (tokeniser, chat template, image preprocessing)."""
        return self.task.processor

    @property
    def stop_signal(self) -> int | None:
        return self.signals.received

    def loader(self, stage: StageConfig, start_batch: int):
        """The LMM task's micro-batches of `stage` for one process (benchmarks and tests read them)."""
        return self.task.batches(self.model, stage, start_batch)

    def _resume(self) -> None:
        found = ckpt.latest_checkpoint(self.run_dir) if self.dist.main else None
        folder = self.dist.broadcast(found[0] if found else None)
        if folder is None:
            self.say(f"--resume: no usable checkpoint in {self.run_dir / 'checkpoints'}; starting from the beginning")
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists() and self.dist.main:  # the rows of the attempt being redone
                metrics.write_text("")
            return
        from mmbridge.train import dcp

        state = found[1] if found else ckpt.load_trainer_state(folder)
        meta = (dcp.load_weights if dcp.is_sharded(folder) else ckpt.load_weights)(self.model, folder)
        sync_processor(self.model, getattr(self.task, "processor", None))  # a stage may have changed the resolution
        self._resume_from = folder
        self.state, self.trained, self.lora = state, set(meta["keys"]), meta.get("lora")
        self.skipped.update(state.get("skipped", {}))
        self.nonfinite = state.get("nonfinite", 0)
        self._steps_before = state.get("steps_before", 0)
        # rows logged after the checkpoint (and a half-written last line) are dropped: they are redone
        metrics = self.run_dir / "metrics.jsonl"
        if (
            "metrics_bytes" in state
            and self.dist.main
            and metrics.exists()
            and metrics.stat().st_size > state["metrics_bytes"]
        ):
            with open(metrics, "r+b") as f:
                f.truncate(state["metrics_bytes"])
        self._metrics_bytes = state.get("metrics_bytes", 0)
        self.say(f"resuming from {folder} (stage {state['stage'] + 1}, step {state['step']})")

    # -- training -----------------------------------------------------------------------------
    def run(self) -> Path:
        try:
            return self._run()
        finally:
            self.trackers.close()

    def log_eval(self, metrics: dict) -> None:
        """Send evaluation metrics (their numbers) to the recipe's trackers, at the run's last step."""
        self.trackers.log(metrics, self._steps_before, prefix="eval")
        self.trackers.close()

    def _run(self) -> Path:
        with self.signals.active():
            for si, stage in enumerate(self.recipe.stages):
                if si < self.state["stage"]:
                    continue
                if self._stop_requested():  # arrived during the previous stage's last step
                    self._announce_stop(ckpt.list_checkpoints(self.run_dir)[0])
                    break
                self.train_stage(si, stage)
                if self.stopped:
                    break
        self.skipped.update(self.task.skipped)
        self.task.skipped = {}
        if self.skipped:
            self.say("skipped samples: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.skipped.items())))
        if self.nonfinite:
            self.say(f"skipped {self.nonfinite} step(s) with a non-finite loss or gradient (see metrics.jsonl)")
        if not self.stopped:
            self.task.finish(self)
        return self.run_dir

    def _announce_stop(self, folder: Path) -> None:
        self.stopped = True
        name = signal.Signals(self.stop_signal).name
        self.say(
            f"stopped by {name}: checkpoint written to {folder}; continue with `mmbridge train <recipe> "
            f"--out {self.run_dir} --resume`",
            flush=True,
        )

    def _stop_requested(self) -> bool:
        """A stop signal reached this process or (under torchrun) any other: all stop at the same step."""
        if self.dist.any(self.stop_signal is not None) and self.stop_signal is None:
            self.signals.received = signal.SIGTERM
        return self.stop_signal is not None

    def _steps(self, stage: StageConfig, n_samples: int | None) -> int:
        if stage.epochs is not None:
            if n_samples is None:
                raise ValueError(f"stage {stage.name!r}: epochs needs sources of known size; set steps for a stream")
            return max(1, math.ceil(stage.epochs * n_samples / (stage.batch_size * stage.grad_accum)))
        return stage.steps

    def _micro_batches(self, batches, stage: StageConfig) -> tuple[list[dict], list[float], int, int]:
        """The step's micro-batches on the device, with what the CPU counts before they move: each one's
        share of the normaliser (targets, or sample weights), the tokens and the model FLOPs."""
        micro, totals, tokens, flops = [], [], 0, 0
        for _ in range(stage.grad_accum):
            b = self._next_batch(batches)
            if stage.loss_norm == "sample":
                b["target_weights"] = sample_weights(b["labels"], b.get("segment_ids"))
            b["target_total"] = target_total(b)
            totals.append(b["target_total"])
            tokens += int(b["attention_mask"].sum())
            flops += self._count_flops(b)
            micro.append(self.dist.to_device(b))
        return micro, totals, tokens, flops

    def train_stage(self, si: int, stage: StageConfig) -> None:
        model = self.dist.stage_model(self.model)  # FSDP: the structure this stage shards, weights still in shards
        resuming = self.state["stage"] == si and self.state["step"] > 0
        if not resuming:  # seed first: LoRA and objective initialisation draw from it
            torch.manual_seed(stage.seed)
        if stage.image_size and stage.image_size != model.vision.image_size:
            model.set_image_size(stage.image_size)  # before the modes: the new position table trains if vision does
        sync_processor(model, getattr(self.task, "processor", None))
        injected = apply_stage_modes(model, stage)
        self.lora = self.lora or injected
        self.trained |= trainable_keys(model)
        objective = build_objective(stage.objective, model).to(self.dist.device)
        if hasattr(objective, "read_stage_data"):  # e.g. the concepts objective's vocabulary, from the stage's data
            objective.read_stage_data(model, [self.task.dataset(n) for n in stage.data], self.task.processor.tokenizer)
        self._count_flops = self.task.flops(self.dist.probe(model))
        if not getattr(objective, "runs_lm", True) and hasattr(self._count_flops, "images_only"):
            self._count_flops.images_only()  # e.g. the concepts objective: encoder and bridge, no LM pass
        self.objective = objective
        step_fn = self.dist.wrap(model, objective)  # objective(model, batch), under DDP / FSDP if asked
        self.model = model  # under FSDP now sharded, holding the weights
        groups = param_groups(model, stage, objective)
        optimizer = torch.optim.AdamW(groups, betas=tuple(stage.betas), eps=stage.eps)
        start_step = self.state["step"] if resuming else 0
        self._consumed = self.state.get("batches", start_step * stage.grad_accum) if resuming else 0
        loader, n_samples = self.task.loader(model, stage, self._consumed, self.dist)  # this rank's slices
        total = self._steps(stage, n_samples)
        warmup = int(round(stage.warmup * total))
        peak = [g["lr"] for g in groups]
        batches = iter(loader)  # this draws a seed from the torch RNG, so it comes before restoring it
        if resuming:  # optimizer and objective state, from a sharded or a consolidated checkpoint
            from mmbridge.train import dcp

            dcp.restore(step_fn, optimizer, objective, self.state, self._resume_from, self.dist)
            ckpt.set_rng_state(self.state["rng"])
            self.dist.set_cuda_rng_states(self.state["rng"].get("cuda"))
        trainable, params = count_params(model)
        self.say(
            f"stage {si + 1}/{len(self.recipe.stages)} {stage.name!r}: {total} steps, "
            f"{n_samples if n_samples is not None else 'streamed'} samples, {trainable / 1e6:.2f}M of "
            f"{params / 1e6:.1f}M parameters train ({', '.join(f'{k}={v}' for k, v in stage.train.items())})"
            f" on {self.dist.device}"
        )
        metrics = self.run_dir / "metrics.jsonl"
        log = open(metrics if self.dist.main else os.devnull, "a")
        bar = tqdm(
            range(start_step, total),
            initial=start_step,
            total=total,
            desc=stage.name,
            disable=not (self.progress and self.dist.main),
            dynamic_ncols=True,
        )
        params_to_clip = [p for g in groups for p in g["params"]]
        streak = 0  # consecutive skipped steps
        for step in bar:
            for g, lr in zip(optimizer.param_groups, peak):
                g["lr"] = lr * warmup_cosine(step, total, warmup, stage.min_lr_ratio)
            t0 = time.perf_counter()
            micro, totals, tokens, flops = self._micro_batches(batches, stage)
            t_data = time.perf_counter() - t0
            # all ranks' targets (tokens, or samples); DDP/FSDP average gradients over ranks, hence the world size
            normalizer = max(self.dist.sum([sum(totals)])[0], 1) / self.dist.world
            loss_sum = torch.zeros((), device=self.dist.device)
            terms: dict = {}
            stats: dict = {}
            for i, b in enumerate(micro):
                with self.dist.no_sync(step_fn, last=i == len(micro) - 1):
                    out = step_fn(b, normalizer)
                    out.loss.backward()  # a non-finite loss makes non-finite gradients: the step is skipped below
                loss_sum += out.loss.detach().float()
                for k, v in out.terms.items():
                    terms[k] = terms.get(k, 0.0) + _detached(v)
                stats = out.stats
            grad_norm = self.dist.clip(params_to_clip, stage.clip or math.inf)
            # the one read-back of the step: loss, gradient norm, loss terms and statistics together
            names = list(terms)
            values = torch.stack(
                [
                    loss_sum,
                    grad_norm.float().to(loss_sum.device),
                    *[torch.as_tensor(terms[k], device=loss_sum.device, dtype=torch.float32) for k in names],
                    *[torch.as_tensor(v, device=loss_sum.device, dtype=torch.float32) for v in stats.values()],
                ]
            ).tolist()
            loss, grad, term_values, stat_values = (
                values[0],
                values[1],
                values[2 : 2 + len(names)],
                values[2 + len(names) :],
            )
            bad = None if math.isfinite(loss) else _nonfinite_terms(loss, dict(zip(names, term_values)))
            loss, tokens, flops, terms, bad = self.dist.step_totals(
                loss, tokens, flops, dict(zip(names, term_values)), bad
            )
            if bad is None and not math.isfinite(grad):
                bad = (
                    f"gradient norm {grad} with a finite loss {loss:.6g}; first non-finite "
                    f"gradient in {_first_nonfinite_grad(model, objective)}"
                )
            ids = [i for b in micro for i in b["ids"]]
            if bad is None:
                streak = 0
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if self.dist.device.type == "cuda":
                torch.cuda.synchronize(self.dist.device)  # the step's time includes its last kernels
            dt = time.perf_counter() - t0
            if bad is None:
                mfu = round(flops / (dt * self.peak * self.dist.world), 4) if self.peak else None
                rec = {
                    "stage": stage.name,
                    "step": step + 1,
                    "loss": loss,
                    "grad_norm": grad,
                    "tokens": tokens,
                    "tok_per_s": round(tokens / dt, 1),
                    "data_s": round(t_data, 4),
                    "compute_s": round(dt - t_data, 4),
                    "step_s": round(dt, 4),
                    "flops": flops,
                    "mfu": mfu,
                    **{f"loss_{k}": round(v, 6) for k, v in terms.items()},
                    **{k: round(v, 6) for k, v in zip(stats, stat_values)},
                    **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups},
                }
            else:
                streak += 1
                self.nonfinite += 1
                rec = {"stage": stage.name, "step": step + 1, "skipped": bad, "ids": ids}
                if self.dist.main:
                    tqdm.write(
                        f"stage {stage.name!r} step {step + 1}: non-finite {bad}; update skipped "
                        f"({streak} in a row; sample ids {ids})"
                    )
            if bad is not None or (step + 1) % self.recipe.log_every == 0 or step + 1 == total:
                log.write(json.dumps(rec) + "\n")
                log.flush()
                self._metrics_bytes = log.tell()
                self.trackers.log(rec, self._steps_before + step + 1)  # its numbers, to TensorBoard / W&B
            if streak >= self.recipe.max_nonfinite_steps:
                bar.close()
                log.close()
                last = ckpt.list_checkpoints(self.run_dir)
                raise NonFiniteError(
                    f"stage {stage.name!r} step {step + 1}: {streak} steps in a row with a non-finite loss or "
                    f"gradient (max_nonfinite_steps={self.recipe.max_nonfinite_steps}), none applied. This step: "
                    f"{bad}; batch sample ids {ids}. Last good checkpoint: {last[0] if last else 'none yet'}"
                )
            if bad is None:
                shown = {"loss": f"{loss:.3f}", "tok_s": f"{tokens / dt:.0f}", "data": f"{t_data / dt:.0%}"}
                if rec["mfu"] is not None:
                    shown["mfu"] = f"{rec['mfu']:.1%}"
                bar.set_postfix(shown)
            self.state = {"stage": si, "step": step + 1}
            if step + 1 == total:
                break
            saved = None
            if self.recipe.save_every and (step + 1) % self.recipe.save_every == 0 and bad is None:
                saved = self.save_checkpoint(optimizer, stage=si, step=step + 1, objective=objective, wrapped=step_fn)
            if self._stop_requested():
                bar.close()
                log.close()
                self._announce_stop(
                    saved
                    or self.save_checkpoint(optimizer, stage=si, step=step + 1, objective=objective, wrapped=step_fn)
                )
                return
        bar.close()
        log.close()
        saved = self.dist.trained(self.model, self.trained)  # FSDP: the trained weights gathered on rank 0
        self._metrics_bytes = metrics.stat().st_size if self.dist.main else 0
        self._steps_before += total
        self.state = {"stage": si + 1, "step": 0}
        self.save_checkpoint(None, stage=si + 1, step=0, weights=saved)  # consolidated, written by rank 0
        if self.dist.main:
            ckpt.save_weights(saved, self.trained, self.run_dir / "model", self._meta(si + 1, 0))
            plot_losses(metrics, stage.name, self.run_dir / f"loss_{si + 1}_{stage.name}.png")
        self.dist.barrier()

    def _next_batch(self, batches) -> dict:
        while True:
            b = next(batches)
            self._consumed += 1
            self.skipped.update({f"batch: {k}": v for k, v in b["skipped"].items()})
            if not self.dist.any(b.get("empty")):  # under torchrun: dropped on all ranks if empty on any
                return b

    def _meta(self, stage: int, step: int) -> dict:
        return {
            "keys": sorted(self.trained),
            "lora": self.lora,
            "moe": getattr(self.model.lm, "moe_config", None),
            "mma": getattr(self.model.lm, "mma_config", None),
            "image_size": getattr(self.model.vision, "image_size", None),
            "stage": stage,
            "step": step,
        }

    def save_checkpoint(self, optimizer, stage: int, step: int, objective=None, wrapped=None, weights=None) -> Path:
        """Weights plus what an exact mid-stage resume needs (optimizer, objective, RNG, data position).

        Under torchrun, mid-stage checkpoints are sharded (`train/dcp.py`, every rank writes); stage ends are
        consolidated and written by rank 0 (from `weights`, the trained ones, under FSDP)."""
        rng = ckpt.rng_state()
        cuda = self.dist.cuda_rng_states()  # a collective under torchrun: every rank calls it
        if cuda is not None:
            rng["cuda"] = cuda
        state = {
            "stage": stage,
            "step": step,
            "batches": self._consumed,
            "rng": rng,
            "skipped": {k: v for k, v in self.skipped.items() if k.startswith("batch: ")},
            "nonfinite": self.nonfinite,
            "metrics_bytes": self._metrics_bytes,
            "steps_before": self._steps_before,
        }
        if optimizer is not None and self.dist.enabled:
            from mmbridge.train import dcp

            return dcp.save(
                self.run_dir,
                wrapped,
                optimizer,
                self.trained,
                self._meta(stage, step),
                state,
                self.recipe.keep_checkpoints,
                self.dist,
            )
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
            state["objective"] = objective.state_dict() if objective is not None else {}
        folder = ckpt.checkpoint_dir(self.run_dir, stage, step)
        if self.dist.main:
            folder = ckpt.save_checkpoint(
                self.run_dir,
                self.model if weights is None else weights,
                self.trained,
                self._meta(stage, step),
                state,
                self.recipe.keep_checkpoints,
            )
        self.dist.barrier()
        return folder


def train(recipe: Recipe, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    trainer = Trainer(recipe, run_dir, resume=resume, progress=progress)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()
