"""Devices: resolution and its errors, the recipe key and CLI flag, MFU peaks by exact GPU name, CUDA RNG
in checkpoints (GPU only), and `demo --out` never touching a directory it did not make."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from mmbridge.device import DeviceError, check_spec, resolve_device
from mmbridge.train.flops import gpu_peak

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.py)")


@cpu_only
def test_auto_is_the_cpu_and_cuda_is_a_clear_error_without_cuda():
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(DeviceError, match=r"--device cuda(:\d)? \(recipe key `device`\): CUDA is not available"):
            resolve_device(spec)
    for bad in ("gpu", "cuda:x", "cuda:-1", ""):
        with pytest.raises(DeviceError, match="is not a device; expected auto, cpu, cuda or cuda:N"):
            check_spec(bad)


@cpu_only
def test_the_recipe_key_and_the_cli_flag_name_the_missing_device(tiny_recipe, tmp_path, capsys):
    import yaml

    from mmbridge.cli import main
    from mmbridge.config import RecipeError, recipe_from_dict, recipe_to_dict
    from mmbridge.train.trainer import Trainer

    data = recipe_to_dict(tiny_recipe)
    with pytest.raises(RecipeError, match="recipe.device: 'tpu' is not a device"):
        recipe_from_dict({**data, "device": "tpu"})
    with pytest.raises(DeviceError, match="--device cuda"):
        Trainer(recipe_from_dict({**data, "device": "cuda"}), tmp_path / "run", progress=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path), "--out", str(tmp_path / "cli"), "--device", "cuda:1"])
    assert exit_.value.code == 2
    assert "--device cuda:1 (recipe key `device`): CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "metrics.jsonl").exists()  # refused before anything trained


def test_gpu_peaks_match_exact_names_only():
    assert gpu_peak("NVIDIA H100 80GB HBM3") == 989.4e12 and gpu_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak("NVIDIA H200") == 989.4e12 and gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak("NVIDIA L4") == 121e12 and gpu_peak("NVIDIA L40S") == 362.05e12
    for unknown in ("NVIDIA A10G", "NVIDIA H100", "Tesla T4", "NVIDIA L40"):  # no guessing by a prefix
        assert gpu_peak(unknown) is None


def test_an_unknown_peak_logs_no_mfu(tiny_recipe, tmp_path, monkeypatch):
    from mmbridge.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "device_peak", lambda device: (None, "unknown GPU"))
    tiny_recipe.stages = tiny_recipe.stages[:1]
    trainer_module.Trainer(tiny_recipe, tmp_path / "run", progress=False).run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["mfu"] is None and r["flops"] > 0 for r in rows)


def test_a_training_step_reads_the_device_back_once(tiny_recipe, tmp_path, monkeypatch):
    """No `.item()` per micro-batch: losses and terms stay tensors until the step's one read-back."""
    from mmbridge.train.trainer import Trainer

    tiny_recipe.stages = tiny_recipe.stages[:1]
    tiny_recipe.stages[0].grad_accum = 3
    trainer = Trainer(tiny_recipe, tmp_path / "run", progress=False)
    calls = {"item": 0, "tolist": 0}
    item, tolist = torch.Tensor.item, torch.Tensor.tolist

    def counted(name, fn):
        def wrapper(self, *a, **kw):
            # AdamW reads its step counter, a CPU tensor (not a device sync), with .item()
            if (self.dim() == 0 or name == "tolist") and "torch/optim" not in sys._getframe(1).f_code.co_filename:
                calls[name] += 1
            return fn(self, *a, **kw)

        return wrapper

    original = trainer._micro_batches

    def micro_batches(*a, **kw):  # counting starts once the step's batches are on the device
        out = original(*a, **kw)
        monkeypatch.setattr(torch.Tensor, "item", counted("item", item))
        monkeypatch.setattr(torch.Tensor, "tolist", counted("tolist", tolist))
        return out

    def clip(params, max_norm):  # counting ends with the step's one read-back (the .tolist() after the clip)
        norm = real_clip(params, max_norm)
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self, *a: (monkeypatch.undo(), tolist(self, *a))[1])
        return norm

    trainer._micro_batches = micro_batches
    real_clip = trainer.dist.clip
    trainer.dist.clip = clip
    tiny_recipe.stages[0].steps = 1
    trainer.run()
    assert calls["item"] == 0 and calls["tolist"] == 0, calls  # before the read-back: none
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["loss"] > 0


@needs_cuda
def test_a_checkpoint_holds_and_restores_the_cuda_rng_states(tiny_recipe, tmp_path):
    from mmbridge.train import checkpoint as ckpt
    from mmbridge.train.trainer import Trainer

    tiny_recipe.stages = tiny_recipe.stages[:1]
    tiny_recipe.save_every = 1
    trainer = Trainer(tiny_recipe, tmp_path / "run", progress=False)
    assert trainer.model.device.type == "cuda"
    trainer.run()
    state = ckpt.load_trainer_state(ckpt.list_checkpoints(tmp_path / "run")[1])  # a mid-stage one
    cuda = state["rng"]["cuda"]
    assert len(cuda) == torch.cuda.device_count() and all(s.dtype == torch.uint8 for s in cuda)
    torch.cuda.manual_seed_all(1234)
    trainer.dist.set_cuda_rng_states(cuda)
    assert torch.equal(torch.cuda.get_rng_state(), cuda[torch.cuda.current_device()])


# -- demo --out -------------------------------------------------------------------------------------------
def test_demo_refuses_a_foreign_non_empty_directory_and_touches_nothing(tmp_path, capsys):
    from mmbridge.cli import main

    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    files = {mine / "notes.txt": "keep me", mine / "sub" / "data.bin": "\x00\x01"}
    for p, text in files.items():
        p.write_text(text)
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--quick", "--out", str(mine)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"--out {mine}: a non-empty directory that is not an earlier demo run" in err and "nothing was changed" in err
    )
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before
    assert all(p.read_text() == text for p, text in files.items())


def test_demo_replaces_only_its_own_earlier_run(tmp_path):
    from mmbridge.demo import MARKER, clear_run_dir

    run = tmp_path / "run"
    clear_run_dir(run)  # new: created with the marker
    (run / "metrics.jsonl").write_text("old")
    clear_run_dir(run)  # an earlier demo run: cleared
    assert sorted(p.name for p in run.iterdir()) == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    clear_run_dir(empty)  # an empty directory is fine
    assert (empty / MARKER).is_file()
