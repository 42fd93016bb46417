"""Several processes under `torchrun`: the process group, DDP / FSDP2 wrapping, rank slices, reductions.

One training step always consumes the recipe's global batch, `batch_size x grad_accum` samples,
whatever the number of processes: every micro-batch the sampler draws is cut into `world_size`
contiguous slices and rank r trains on slice r. The target-token count is summed over ranks before
the backward passes, so the loss, the gradient and hence the whole loss sequence match a single
process's (up to float rounding), and a checkpoint resumes with any number of processes.

Without `torchrun` (or with `strategy: none`) `Dist` is a world of one whose methods do nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from mmbridge.device import resolve_device
from mmbridge.train.step import TrainStep


def may_leave_unused(step: TrainStep) -> bool:
    """Whether a forward of this stage can leave a trained parameter out of the autograd graph, so that DDP must
    look for such parameters after every forward (`find_unused_parameters`, a walk of the whole graph per step;
    without it DDP stops at the next step). Decided from what the stage trains:

    - the vision encoder or the bridge (or anything outside the LM) trains: a micro-batch of text-only samples
      (interleaved or mixed data) or of cached features runs neither;
    - the objective is not the plain next-token loss (`lm`): the others read part of the model (`lexical` runs the
      bridge alone, never the LM) or own parameters a batch may not reach (Croc's prompt pool).

    So only a stage that trains the LM alone (in full, LoRA, MoE experts, which every take part as `moe.py`
    arranges, LaVIN's LM adapters) under the `lm` objective runs without the search."""
    from mmbridge.objectives.captioning import NextTokenLoss

    if type(step.objective) is not NextTokenLoss:
        return True
    return any(p.requires_grad and not n.startswith("model.lm.") for n, p in step.named_parameters())


class RankSlice:
    """Rank `rank`'s contiguous slice of every batch of indices a batch sampler yields (of its packed rows,
    if it yields (sample, row) pairs); sizes differ by at most one when the batch does not divide evenly."""

    def __init__(self, sampler, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for idx in self.sampler:
            idx = list(idx)
            packed = bool(idx) and isinstance(idx[0], tuple)  # (sample, row) pairs: split by rows
            units = sorted({row for _, row in idx}) if packed else idx
            if len(units) < self.world:
                raise ValueError(
                    f"a micro-batch of {len(units)} {'rows' if packed else 'samples'} cannot be split "
                    f"over {self.world} processes; make batch_size at least the world size"
                )
            k, extra = divmod(len(units), self.world)  # the first `extra` ranks take one more
            start = self.rank * k + min(self.rank, extra)
            mine = units[start : start + k + (self.rank < extra)]
            yield [x for x in idx if x[1] in set(mine)] if packed else mine


def blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an encoder or decoder: the items of its largest ModuleList of one class."""
    best, size = [], 0
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = list(m), n
    return best


class Dist:
    """This process's place in the job (rank, world size, device) and the collective operations.

    `strategy` is the recipe's: `none` (one process), `ddp` or `fsdp`; `device` its device spec (see
    `device.py`: `auto` is this process's GPU when there is one). The process group is gloo on CPU,
    nccl on GPU, initialised from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).
    """

    def __init__(self, strategy: str = "none", device: str = "auto"):
        self.strategy = strategy
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = strategy != "none" and world > 1
        self.rank, self.world = 0, 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if strategy != "none" and world == 1 and "RANK" not in os.environ:
            print(f"strategy {strategy!r}: not started by torchrun, training in one process")
        if not self.enabled:
            return
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30)
            )
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.fsdp:
            from mmbridge.train.fsdp import ShardedStages

            self._stages = ShardedStages(self.device, self.main)
            if self.device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ and self.main:
                print(
                    "FSDP on CPU: glibc's malloc keeps the all-gather buffers FSDP frees, so resident memory "
                    "grows step by step; MALLOC_MMAP_THRESHOLD_=65536 returns them (docs/guide/training-at-scale.md)"
                )

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a world of one) ---------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def step_totals(self, loss: float, tokens: int, flops: int, terms: dict, bad: str | None):
        """A step's loss and loss terms (each rank's were scaled by the world size: see the trainer),
        tokens and FLOPs summed over ranks; a non-finite loss anywhere marks the step bad everywhere."""
        if not self.enabled:
            return loss, tokens, flops, terms, bad
        loss, tokens, flops, n_bad, *values = self.sum([loss, tokens, flops, float(bad is not None), *terms.values()])
        terms = type(terms)({k: v / self.world for k, v in zip(terms, values)})
        if n_bad and bad is None:
            bad = "loss on another rank"
        return loss / self.world, int(tokens), int(flops), terms, bad

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor's element-wise sum over ranks (a new tensor without a graph), on its device."""
        t = t.detach().clone()
        if self.enabled:
            dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        return bool(flag) if not self.enabled else self.sum([float(bool(flag))])[0] > 0

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # -- data ---------------------------------------------------------------------------------------
    def shard_loader(self, loader: DataLoader) -> DataLoader:
        """The same loader reading only this rank's slice of every micro-batch (a loader that is already
        per process, `per_rank`, is returned as it is)."""
        if not self.enabled or getattr(loader, "per_rank", False):
            return loader
        extra = (
            {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
            if loader.num_workers
            else {}
        )
        return DataLoader(
            loader.dataset,
            batch_sampler=RankSlice(loader.batch_sampler, self.rank, self.world),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            worker_init_fn=loader.worker_init_fn,
            pin_memory=self.device.type == "cuda",
            **extra,
        )

    def to_device(self, batch: dict) -> dict:
        return to_device(batch, self.device)

    def cuda_rng_states(self) -> list[torch.Tensor] | None:
        """The CUDA RNG states a resume must restore: every device's in one process, each rank's own
        device's (indexed by rank) under torchrun; None where CUDA was never used."""
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        if not self.enabled:
            return torch.cuda.get_rng_state_all()
        box = [None] * self.world
        dist.all_gather_object(box, torch.cuda.get_rng_state(self.device))
        return box

    def set_cuda_rng_states(self, states: list[torch.Tensor] | None) -> None:
        if not states or not torch.cuda.is_available():
            return
        if not self.enabled and len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        elif self.enabled and self.device.type == "cuda":
            torch.cuda.set_rng_state(states[self.rank if len(states) == self.world else 0], self.device)
        else:
            torch.cuda.set_rng_state(states[0], self.device if self.device.type == "cuda" else 0)

    # -- model --------------------------------------------------------------------------------------
    @property
    def fsdp(self) -> bool:
        return self.enabled and self.strategy == "fsdp"

    def building(self):
        """The context a task builds its model in: under FSDP, its pretrained parts go on the meta device."""
        from mmbridge.models.meta import meta_build

        return meta_build() if self.fsdp else contextlib.nullcontext()

    def place(self, model: nn.Module) -> nn.Module:
        """The built model on this process's device; under FSDP as it is (each stage shards it there)."""
        return model if self.fsdp else model.to(self.device)

    def stage_model(self, model: nn.Module) -> nn.Module:
        """The module a stage sets up and trains: `model`, or under FSDP the structure to shard (`train/fsdp.py`)."""
        return self._stages.structure(model) if self.fsdp else model

    def probe(self, model: nn.Module) -> nn.Module:
        """A model to count FLOPs on (a forward pass on zeros): under FSDP its structure on the meta device."""
        from mmbridge.models.meta import meta_copy

        return meta_copy(model) if self.fsdp else model

    def wrap(self, model: nn.Module, objective: nn.Module, moe_weight: float = 0.0) -> nn.Module:
        """`TrainStep(model, objective, moe_weight)` (`train/step.py`), under DDP or sharded with FSDP2 (`fully_shard` per LM decoder
        layer and per vision block, then the rest as the root) with each rank's shards filled. Frozen
        parameters are sharded like the rest and get no gradient. On GPU, FSDP computes in bf16 and
        reduces in fp32; on CPU, fp32."""
        step = TrainStep(model, objective, self.sum_tensor if self.enabled else None, moe_weight)
        if not self.enabled:
            return step
        if self.strategy == "ddp":
            step.to(self.device)
            trains = any(p.requires_grad for p in step.parameters())
            if not trains:
                return step
            ids = [self.local_rank] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(
                step, device_ids=ids, find_unused_parameters=may_leave_unused(step)
            )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.device.type == "cuda"
            else MixedPrecisionPolicy()
        )
        return self._stages.shard(
            step, [*blocks(model.vision), *blocks(model.lm)], lambda m: fully_shard(m, mesh=mesh, mp_policy=mp)
        )

    def no_sync(self, step: nn.Module, last: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-batch of a step."""
        if not last and isinstance(step, nn.parallel.DistributedDataParallel):
            return step.no_sync()
        return contextlib.nullcontext()

    def clip(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Global gradient norm (over all ranks' shards), clipped to `max_norm`; a plain tensor."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def trained(self, model: nn.Module, keys: set[str]):
        """What a stage end saves: `model` itself, or under FSDP its trained weights `keys` gathered whole
        on rank 0 (a dict; empty on the other ranks)."""
        return self._stages.trained_weights(keys) if self.fsdp else model

    def part(self, model: nn.Module, name: str) -> nn.Module | None:
        """`model.<name>` with its weights; under FSDP gathered on rank 0 (None elsewhere; all ranks call it)."""
        return self._stages.unsharded(name) if self.fsdp else model.get_submodule(name)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device` (copied asynchronously from pinned memory); other values as they are."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
