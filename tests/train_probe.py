"""Run by the distributed tests in one process or on each torchrun rank: train a recipe and record, at each stage's
start (once the step is wrapped: under FSDP sharded and filled), the whole values of the parameters the stage
trains and of the LM's MoE and MMA parameters (`start<stage>.safetensors`, written by rank 0: the reference a
trained weight's movement is measured from) and, under FSDP, which parameters each decoder layer's FSDP unit
holds, with their local rows (`units<stage>.json`, per rank)."""

import json
import sys
from pathlib import Path

import yaml
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from mmbridge.config import recipe_from_dict
from mmbridge.models.mma import is_mma_param
from mmbridge.models.moe import is_moe_param
from mmbridge.train import distributed
from mmbridge.train.trainer import Trainer


def record(out: Path, stage: int, step, dist) -> None:
    bare = getattr(step, "module", step).model  # DDP wraps the TrainStep
    start = {}
    for name, p in bare.named_parameters():
        if p.requires_grad or is_moe_param(name) or is_mma_param(name):
            full = p.full_tensor() if isinstance(p, DTensor) else p  # a collective: every rank gathers
            start[name] = full.detach().cpu().contiguous().clone()
    if dist.main:
        save_file(
            start,
            str(out / f"start{stage}.safetensors"),
            metadata={"trained": json.dumps(sorted(n for n, p in bare.named_parameters() if p.requires_grad))},
        )
    if not dist.fsdp:
        return
    units = {}
    for i, layer in enumerate(bare.lm.get_decoder().layers):
        held = {id(fp.sharded_param) for fp in layer._get_fsdp_state()._fsdp_param_group.fsdp_params}
        units[f"lm.model.layers.{i}"] = {
            n: [p.to_local().shape[0], p.shape[0]]
            for n, p in layer.named_parameters()
            if id(p) in held and isinstance(p, DTensor)
        }
    (out / f"units{stage}_{dist.rank}.json").write_text(json.dumps(units))


def main(recipe: str, out: str) -> None:
    out = Path(out)
    wrap, stages = distributed.Dist.wrap, []

    def recording_wrap(dist, model, objective, *args, **kwargs):
        step = wrap(dist, model, objective, *args, **kwargs)
        stages.append(len(stages) + 1)
        record(out, stages[-1], step, dist)
        return step

    distributed.Dist.wrap = recording_wrap
    trainer = Trainer(recipe_from_dict(yaml.safe_load(Path(recipe).read_text())), out, progress=False)
    try:
        trainer.run()
    finally:
        trainer.dist.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
