"""The engine reaches a kind of training only through its `TrainSpec` (train/spec.py): a spec whose hooks are
wrapped sees every call the engine makes, in order, and what its `run_meta` returns is what the run saves."""

from __future__ import annotations

import dataclasses
import json

from mmbridge.train.tasks import spec_for
from mmbridge.train.trainer import Trainer


def recorded(spec, calls: list):
    """The same spec, each hook noting its name (and the stage it was given) before it runs."""

    def note(name, fn):
        def hook(*args, **kwargs):
            stage = next((a.name for a in args if hasattr(a, "grad_accum")), None)
            calls.append((name, stage))
            return fn(*args, **kwargs)

        return hook

    hooks = ("build", "loader", "flops", "prepare_stage", "bind_objective", "run_meta", "finish", "skipped")
    return dataclasses.replace(spec, **{h: note(h, getattr(spec, h)) for h in hooks})


def test_the_engine_calls_the_spec_hooks_in_order_and_saves_its_meta(tiny_recipe, tmp_path):
    calls: list = []
    base = spec_for(tiny_recipe)
    meta_of = base.run_meta
    spec = recorded(dataclasses.replace(base, run_meta=lambda m: {**meta_of(m), "kind_note": "from the spec"}), calls)
    trainer = Trainer(tiny_recipe, tmp_path / "run", progress=False, spec=spec)
    assert trainer.spec is spec and trainer.task is base.task
    trainer.run()
    names = [s.name for s in tiny_recipe.stages]
    per_stage = [c for c in calls if c[0] in ("prepare_stage", "bind_objective", "flops", "loader")]
    want = [(h, s) for s in names for h in ("prepare_stage", "bind_objective", "flops", "loader")]
    # flops is given the model, not the stage; the others name it
    assert [(h, s if h != "flops" else None) for h, s in want] == per_stage
    assert calls[0] == ("build", None)
    assert calls[-2:] == [("skipped", None), ("finish", None)]
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["kind_note"] == "from the spec" and "image_size" in meta  # the LMM spec's own meta kept


def test_the_lmm_spec_saves_what_load_run_rebuilds(tiny_recipe):
    spec = spec_for(tiny_recipe)
    model, _ = spec.build()
    assert spec.name == "lmm" and spec.task.processor is not None
    assert spec.run_meta(model) == {"moe": None, "mma": None, "image_size": model.vision.image_size}
