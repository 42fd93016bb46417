"""The training engine: a recipe's stages in order, each starting from the previous stage's weights.

One engine for every kind of training (`train/task.py` says what a kind supplies). Built to survive
long runs: a resumed run continues with the same data position, RNG (CPU, numpy, Python and every
CUDA device), optimizer and objective state, so its losses match an uninterrupted run's; SIGTERM or
SIGINT finish the step, write a checkpoint and return; a step with a non-finite loss or gradient is
skipped and counted, and `max_nonfinite_steps` in a row stop the run with a diagnostic. Checkpoint
files and their checks live in `train/checkpoint.py`.

The device is picked once (`device.py`); the model lives there and every micro-batch is moved
there after its token, target and FLOP counts are taken on the CPU, so a step reads the device back
once (loss, gradient norm and loss terms together), not once per micro-batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmbridge.config import Recipe, StageConfig, recipe_to_dict
from mmbridge.device import allow_tf32
from mmbridge.loss_norm import sample_weights, target_total
from mmbridge.objectives import build_objective
from mmbridge.runs import save_recipe
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.distributed import Dist
from mmbridge.train.flops import device_peak
from mmbridge.train.parts import apply_stage_modes, count_params, moe_balance_weight, param_groups, trainable_keys
from mmbridge.train.plots import plot_losses
from mmbridge.train.schedule import warmup_cosine
from mmbridge.train.signals import StopSignals
from mmbridge.train.spec import TrainSpec
from mmbridge.train.tasks import spec_for
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


@dataclass
class StageRun:
    """One stage as it trains: what its steps share."""

    index: int
    stage: StageConfig
    model: torch.nn.Module  # under FSDP the sharded one
    objective: torch.nn.Module
    step_fn: torch.nn.Module  # objective(model, batch), under DDP / FSDP if asked
    optimizer: torch.optim.Optimizer
    clipped: list  # the parameters whose gradient norm is clipped
    peak: list[float]  # each parameter group's peak learning rate
    total: int
    warmup: int
    start: int  # the first step (a resumed stage starts later)
    batches: Iterator[dict]
    streak: int = 0  # consecutive steps skipped for a non-finite loss or gradient


class Trainer:
    """Runs a recipe's stages in order, writing checkpoints, metrics and plots to `run_dir`.

    The run directory is checked (writable, room for the checkpoints) before anything trains.
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
        spec: TrainSpec | None = None,
    ):
        self.recipe, self.run_dir, self.progress = recipe, Path(run_dir), progress
        # one process unless started by torchrun with strategy ddp | fsdp; the device is picked here, once
        self.dist = Dist(recipe.strategy, recipe.device)
        self.say = print if self.dist.main else (lambda *a, **k: None)
        ckpt.check_run_dir(self.run_dir)
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        allow_tf32(self.dist.device, recipe.model.precision)
        torch.manual_seed(recipe.seed)
        self.spec = spec or spec_for(recipe)  # what the recipe's kind supplies: builders and hooks
        self.task = self.spec.task
        with self.dist.building():  # FSDP: the pretrained parts on the meta device, each rank reads its shards
            model, self.tokenizer = self.spec.build()
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
            save_recipe(recipe, self.run_dir)
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
        self.spec.after_load(self.model)  # e.g. a stage changed the resolution: the processor follows
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
        self.skipped.update(self.spec.skipped())
        if self.skipped:
            self.say("skipped samples: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.skipped.items())))
        if self.nonfinite:
            self.say(f"skipped {self.nonfinite} step(s) with a non-finite loss or gradient (see metrics.jsonl)")
        if not self.stopped:
            self.spec.finish(self)
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
        """Set the stage up, run its steps (each: `train_step`, then logging, then a checkpoint or a stop when
        due), and save its weights."""
        run = self._setup_stage(si, stage)
        metrics = self.run_dir / "metrics.jsonl"
        bar = tqdm(
            range(run.start, run.total),
            initial=run.start,
            total=run.total,
            desc=stage.name,
            disable=not (self.progress and self.dist.main),
            dynamic_ncols=True,
        )
        with open(metrics if self.dist.main else os.devnull, "a") as log, contextlib.closing(bar):
            for step in bar:
                rec = self.train_step(run, step)
                self._log_step(run, step, rec, log, bar)
                self.state = {"stage": si, "step": step + 1}
                if step + 1 == run.total:
                    break
                if self._checkpoint_or_stop(run, step, rec):
                    return
        self._finish_stage(run, metrics)

    def _setup_stage(self, si: int, stage: StageConfig) -> StageRun:
        """The stage's model modes, objective, optimizer and data, restored to the checkpoint when resuming."""
        model = self.dist.stage_model(self.model)  # FSDP: the structure this stage shards, weights still in shards
        resuming = self.state["stage"] == si and self.state["step"] > 0
        if not resuming:  # seed first: LoRA and objective initialisation draw from it
            torch.manual_seed(stage.seed)
        self.spec.prepare_stage(model, stage)
        injected = apply_stage_modes(model, stage)
        self.lora = self.lora or injected
        self.trained |= trainable_keys(model)
        objective = build_objective(stage.objective, model).to(self.dist.device)
        self.spec.bind_objective(model, stage, objective)
        self._count_flops = self.spec.flops(self.dist.probe(model), objective)
        self.objective = objective
        # objective(model, batch) (+ the MoE balancing loss in an `lm: moe` stage), under DDP / FSDP if asked
        step_fn = self.dist.wrap(model, objective, moe_balance_weight(model, stage))
        self.model = model  # under FSDP now sharded, holding the weights
        groups = param_groups(model, stage, objective)
        optimizer = torch.optim.AdamW(groups, betas=tuple(stage.betas), eps=stage.eps)
        start = self.state["step"] if resuming else 0
        self._consumed = self.state.get("batches", start * stage.grad_accum) if resuming else 0
        loader, n_samples = self.spec.loader(model, stage, self._consumed, self.dist)  # this rank's slices
        total = self._steps(stage, n_samples)
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
        return StageRun(
            index=si,
            stage=stage,
            model=model,
            objective=objective,
            step_fn=step_fn,
            optimizer=optimizer,
            clipped=[p for g in groups for p in g["params"]],
            peak=[g["lr"] for g in groups],
            total=total,
            warmup=int(round(stage.warmup * total)),
            start=start,
            batches=batches,
        )

    def train_step(self, run: StageRun, step: int) -> dict:
        """One optimizer step: the scheduled learning rates, the micro-batches' forward and backward passes, the
        clipped update (skipped when the loss or a gradient is not finite). Returns the step's metrics row."""
        for g, lr in zip(run.optimizer.param_groups, run.peak):
            g["lr"] = lr * warmup_cosine(step, run.total, run.warmup, run.stage.min_lr_ratio)
        t0 = time.perf_counter()
        micro, totals, tokens, flops = self._micro_batches(run.batches, run.stage)
        t_data = time.perf_counter() - t0
        loss, grad, terms, stats = self.forward_backward_step(run, micro, totals)
        bad = None if math.isfinite(loss) else _nonfinite_terms(loss, terms)
        loss, tokens, flops, terms, bad = self.dist.step_totals(loss, tokens, flops, terms, bad)
        if bad is None and not math.isfinite(grad):
            bad = (
                f"gradient norm {grad} with a finite loss {loss:.6g}; first non-finite "
                f"gradient in {_first_nonfinite_grad(run.model, run.objective)}"
            )
        self.optimizer_step(run.optimizer, apply=bad is None)
        dt = time.perf_counter() - t0
        if bad is not None:
            return {
                "stage": run.stage.name,
                "step": step + 1,
                "skipped": bad,
                "ids": [i for b in micro for i in b["ids"]],
            }
        mfu = round(flops / (dt * self.peak * self.dist.world), 4) if self.peak else None
        return {
            "stage": run.stage.name,
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
            **{k: round(v, 6) for k, v in stats.items()},
            **{f"lr_{g['name']}": g["lr"] for g in run.optimizer.param_groups},
        }

    def forward_backward_step(self, run: StageRun, micro: list[dict], totals: list[float]):
        """Forward and backward over the step's micro-batches (gradients synchronised on the last), each loss
        normalised by all ranks' targets; then the clipped gradient norm. One read-back of the device for the
        whole step: (loss, grad norm, loss terms, statistics) as Python floats."""
        # all ranks' targets (tokens, or samples); DDP/FSDP average gradients over ranks, hence the world size
        normalizer = max(self.dist.sum([sum(totals)])[0], 1) / self.dist.world
        loss_sum = torch.zeros((), device=self.dist.device)
        terms: dict = {}
        stats: dict = {}
        for i, b in enumerate(micro):
            with self.dist.no_sync(run.step_fn, last=i == len(micro) - 1):
                out = run.step_fn(b, normalizer)
                out.loss.backward()  # a non-finite loss makes non-finite gradients: the step is skipped
            loss_sum += out.loss.detach().float()
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0.0) + _detached(v)
            stats = out.stats
        grad_norm = self.dist.clip(run.clipped, run.stage.clip or math.inf)
        names, dev = list(terms), loss_sum.device
        values = torch.stack(
            [
                loss_sum,
                grad_norm.float().to(dev),
                *[torch.as_tensor(terms[k], device=dev, dtype=torch.float32) for k in names],
                *[torch.as_tensor(v, device=dev, dtype=torch.float32) for v in stats.values()],
            ]
        ).tolist()
        n = len(names)
        return values[0], values[1], dict(zip(names, values[2 : 2 + n])), dict(zip(stats, values[2 + n :]))

    def optimizer_step(self, optimizer: torch.optim.Optimizer, apply: bool) -> None:
        """The update (when `apply`), then the gradients cleared; on a GPU the step's kernels waited for, so
        that its time is whole."""
        if apply:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)

    def _log_step(self, run: StageRun, step: int, rec: dict, log, bar) -> None:
        """metrics.jsonl and the trackers every `log_every` steps (a skipped step always), the progress bar; a
        streak of `max_nonfinite_steps` skipped steps stops the run with a diagnostic."""
        bad = rec.get("skipped")
        if bad is None:
            run.streak = 0
        else:
            run.streak += 1
            self.nonfinite += 1
            if self.dist.main:
                tqdm.write(
                    f"stage {run.stage.name!r} step {step + 1}: non-finite {bad}; update skipped "
                    f"({run.streak} in a row; sample ids {rec['ids']})"
                )
        if bad is not None or (step + 1) % self.recipe.log_every == 0 or step + 1 == run.total:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            self._metrics_bytes = log.tell()
            self.trackers.log(rec, self._steps_before + step + 1)  # its numbers, to TensorBoard / W&B
        if run.streak >= self.recipe.max_nonfinite_steps:
            last = ckpt.list_checkpoints(self.run_dir)
            raise NonFiniteError(
                f"stage {run.stage.name!r} step {step + 1}: {run.streak} steps in a row with a non-finite loss or "
                f"gradient (max_nonfinite_steps={self.recipe.max_nonfinite_steps}), none applied. This step: "
                f"{bad}; batch sample ids {rec['ids']}. Last good checkpoint: {last[0] if last else 'none yet'}"
            )
        if bad is None:
            shown = {"loss": f"{rec['loss']:.3f}", "tok_s": f"{rec['tok_per_s']:.0f}"}
            shown["data"] = f"{rec['data_s'] / rec['step_s']:.0%}"
            if rec["mfu"] is not None:
                shown["mfu"] = f"{rec['mfu']:.1%}"
            bar.set_postfix(shown)

    def _checkpoint_or_stop(self, run: StageRun, step: int, rec: dict) -> bool:
        """A mid-stage checkpoint every `save_every` good steps; on a stop signal (here or on any rank) one is
        written if this step has none, and True is returned."""
        save = lambda: self.save_checkpoint(  # noqa: E731
            run.optimizer, stage=run.index, step=step + 1, objective=run.objective, wrapped=run.step_fn
        )
        saved = None
        if self.recipe.save_every and (step + 1) % self.recipe.save_every == 0 and "skipped" not in rec:
            saved = save()
        if not self._stop_requested():
            return False
        self._announce_stop(saved or save())
        return True

    def _finish_stage(self, run: StageRun, metrics: Path) -> None:
        """The stage's trained weights (gathered from the shards under FSDP) as a consolidated checkpoint and the
        run's `model/` folder, and its loss plot."""
        saved = self.dist.trained(self.model, self.trained)  # FSDP: the trained weights gathered on rank 0
        self._metrics_bytes = metrics.stat().st_size if self.dist.main else 0
        self._steps_before += run.total
        self.state = {"stage": run.index + 1, "step": 0}
        self.save_checkpoint(None, stage=run.index + 1, step=0, weights=saved)  # consolidated, written by rank 0
        if self.dist.main:
            ckpt.save_weights(saved, self.trained, self.run_dir / "model", self._meta(run.index + 1, 0))
            plot_losses(metrics, run.stage.name, self.run_dir / f"loss_{run.index + 1}_{run.stage.name}.png")
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
            **self.spec.run_meta(self.model),
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
