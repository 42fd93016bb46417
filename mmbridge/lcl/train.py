"""`mmbridge train` for `kind: lcl` recipes: LCL pretraining, then the encoder exported for an LMM.

Single process or `torchrun` (gloo on CPU, nccl on GPUs): every process takes its own slice of each
global batch, gradients are averaged over processes, and process 0 logs and writes. The run
directory holds `recipe.yaml`, `tokenizer/`, `metrics.jsonl`, `checkpoint/` (weights, optimizer and
step, for `--resume`) and the exported encoder (`encoder/`: config.json + model.safetensors). The
language model is discarded, as in the paper.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from mmbridge.lcl.model import LCLModel, build_lm, build_tokenizer
from mmbridge.lcl.readers import as_pairs, iter_shards
from mmbridge.lcl.recipe import LCLRecipe, recipe_to_dict, resolve_documents
from mmbridge.lcl.sequence import ImageCache, SpecialIds, build_sequence, collate
from mmbridge.models.vit import LCLVisionTower, ViTConfig
from mmbridge.train.schedule import warmup_cosine


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_model(recipe: LCLRecipe, tokenizer) -> LCLModel:
    """ViT, LM and contrastive head, from `recipe.seed` (the same init for every objective)."""
    torch.manual_seed(recipe.seed)
    lm = build_lm(recipe.lm, tokenizer)
    width = lm.get_input_embeddings().embedding_dim
    torch.manual_seed(recipe.seed)  # the ViT's init does not depend on the LM's vocabulary
    vit = LCLVisionTower(ViTConfig(**{**recipe.vision, "out_dim": width}))
    model = LCLModel(vit, lm, SpecialIds.of(tokenizer))
    o = recipe.objective
    model.head.log_scale.data.fill_(math.log(1 / o.init_temperature))
    model.head.max_scale = o.max_scale
    return model


class Batches:
    """Each step's documents for this process: global batch g = step·B·W + [0, B·W), slice `rank`.

    In-memory sources go through a seeded permutation per epoch; each document's random layout
    draws from an rng seeded by (seed, epoch, index), so a resumed run sees the same sequences.
    Shard sources stream (shard i to process i mod W); a resume skips the documents already used.
    """

    def __init__(self, recipe: LCLRecipe, rank: int, world: int):
        self.recipe, self.rank, self.world = recipe, rank, world
        self.docs, self.urls = [], []
        for name in recipe.data:
            got = resolve_documents(recipe, name)
            if got and isinstance(got[0], str):
                self.urls += [(u, bool(recipe.sources[name].get("pairs"))) for u in got]
            else:
                self.docs += got
        if self.docs and self.urls:
            raise ValueError("an LCL recipe reads either in-memory sources or shards, not both in one run")
        if not self.docs and not self.urls:
            raise ValueError("the recipe's data holds no documents")

    def texts(self) -> list[str]:
        if self.urls:
            raise ValueError("lm.tokenizer: words needs in-memory sources; name an HF tokenizer for shards")
        return [t for d in self.docs for t in d.texts]

    def _stream(self) -> Iterator[tuple]:
        mine = [u for i, u in enumerate(self.urls) if i % self.world == self.rank]
        if not mine:
            raise ValueError(f"{len(self.urls)} shard(s) for {self.world} processes: need at least one each")
        for epoch in itertools.count():
            order = np.random.default_rng([self.recipe.seed, epoch]).permutation(len(mine))
            for j in order:
                url, pairs = mine[j]
                for k, doc in enumerate(iter_shards([url])):
                    for d in (as_pairs([doc]) if pairs else [doc]):
                        yield d, (epoch, int(j), k)

    def __call__(self, start_step: int) -> Iterator[list[tuple]]:
        b = self.recipe.batch_size
        if self.urls:
            stream = self._stream()
            for _ in range(start_step * b):
                next(stream)
            while True:
                yield [next(stream) for _ in range(b)]
        n = len(self.docs)
        perms: dict[int, np.ndarray] = {}
        for step in itertools.count(start_step):
            g = step * b * self.world + self.rank * b + np.arange(b)
            out = []
            for i in g:
                epoch = int(i // n)
                if epoch not in perms:
                    perms = {epoch: np.random.default_rng([self.recipe.seed, epoch]).permutation(n)}
                idx = int(perms[epoch][i % n])
                out.append((self.docs[idx], (epoch, idx)))
            yield out


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def _save_checkpoint(model, optimizer, step: int, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp / "state.pt")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def train_lcl(recipe: LCLRecipe, run_dir: str | Path, resume: bool = False, progress: bool = True) -> LCLModel:
    """Run LCL pretraining and export the encoder; returns the trained model (ViT, LM and head)."""
    rank, world = setup_distributed()
    run_dir = Path(run_dir)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    device = torch.device("cuda" if recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    batches = Batches(recipe, rank, world)
    tokenizer = build_tokenizer(recipe.lm.get("tokenizer", "words"),
                                batches.texts() if recipe.lm.get("tokenizer", "words") == "words" else None)
    model = build_model(recipe, tokenizer).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)
    start = 0
    ckpt = run_dir / "checkpoint"
    if resume and (ckpt / "state.pt").exists():
        load_model(model, str(ckpt / "model.safetensors"), device=str(device))
        state = torch.load(ckpt / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if rank == 0:
            print(f"resuming from {ckpt} at step {start}")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        tokenizer.save_pretrained(str(run_dir / "tokenizer"))
        if not resume:
            (run_dir / "metrics.jsonl").write_text("")
    c = model.vit.config
    images = ImageCache(c.image_size, c.image_mean, c.image_std)
    ids, n_patches, seq = model.ids, model.n_patches, recipe.sequence

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    obj, warmup = recipe.objective, int(round(recipe.warmup * recipe.steps))
    log = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc=recipe.name,
               disable=not progress or rank != 0, dynamic_ncols=True)
    stream = batches(start)
    model.train()
    for step in bar:
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = recipe.lr * warmup_cosine(step, recipe.steps, warmup, recipe.min_lr_ratio)
        samples = [build_sequence(d, seq, ids, n_patches, encode, np.random.default_rng([recipe.seed, *key]))
                   for d, key in next(stream)]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(samples, ids.pad, images).items()}
        t_data = time.perf_counter() - t0
        out = model(batch, lambda_con=obj.lambda_con, gen_weight=obj.gen_weight)
        out.loss.backward()
        average_gradients(params, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t = out.terms
        loss = obj.gen_weight * t["gen"] + obj.lambda_con * t["con"]
        if log is not None and ((step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps):
            rec = {"step": step + 1, "loss": round(loss, 6), "loss_gen": round(t["gen"], 6),
                   "loss_con": round(t["con"], 6), "logit_scale": round(t["scale"], 4), "images": t["images"],
                   "text_targets": t["targets"], "grad_norm": round(float(grad_norm), 4),
                   "lr": optimizer.param_groups[0]["lr"], "data_s": round(t_data, 4),
                   "step_s": round(time.perf_counter() - t0, 4)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
        bar.set_postfix(gen=f"{t['gen']:.3f}", con=f"{t['con']:.3f}", scale=f"{t['scale']:.1f}")
        if rank == 0 and recipe.save_every and (step + 1) % recipe.save_every == 0 and step + 1 < recipe.steps:
            _save_checkpoint(model, optimizer, step + 1, ckpt)
    bar.close()
    if rank == 0:
        log.close()
        _save_checkpoint(model, optimizer, recipe.steps, ckpt)
        model.vit.save_pretrained(run_dir / recipe.export)
        print(f"encoder exported to {run_dir / recipe.export}")
    return model
