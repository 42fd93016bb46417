"""Run by `test_fsdp_meta.py` in one process or on each torchrun rank: train a recipe, then write this process's
peak resident memory (`rss<RANK>.json`) and the bridge as `Dist.part` gives it (`bridge.safetensors`)."""

import json
import os
import resource
import sys
from pathlib import Path

import yaml
from safetensors.torch import save_file

from mmbridge.config import recipe_from_dict
from mmbridge.train.trainer import Trainer


def main(recipe: str, out: str) -> None:
    trainer = Trainer(recipe_from_dict(yaml.safe_load(Path(recipe).read_text())), out, progress=False)
    try:
        trainer.run()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        bridge = trainer.dist.part(trainer.model, "bridge")  # under FSDP gathered from the shards
        if trainer.dist.main:
            save_file(
                {k: v.contiguous() for k, v in bridge.state_dict().items()}, str(Path(out) / "bridge.safetensors")
            )
    finally:
        trainer.dist.close()
    rank = os.environ.get("RANK", "0")
    (Path(out) / f"rss{rank}.json").write_text(json.dumps({"peak_kib": peak}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
