"""FSDP builds the model on the meta device: the weights each rank reads are those a normal build loads, and two
gloo ranks hold less than one process holding the whole model while giving its losses."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mmbridge.config import ModelConfig
from mmbridge.models import meta
from mmbridge.models.build import build_model
from mmbridge.models.language import add_lora
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.fsdp import fill_from_files
from tests.conftest import tiny_recipe_dict
from tests.test_distributed import assert_same_losses

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tiny_lm_dir, tiny_clip_dir) -> ModelConfig:
    return ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={"name": "pool_adapter", "pooled": 2},
        lm={"path": tiny_lm_dir},
        max_length=128,
        system_prompt="",
    )


def _build(cfg: ModelConfig, lazy: bool):
    torch.manual_seed(0)
    if not lazy:
        return build_model(cfg)[0]
    with meta.meta_build():
        return build_model(cfg)[0]


def test_read_rows_reads_rows_in_the_files_dtype(tmp_path):
    tensors = {"a": torch.randn(5, 3).to(torch.bfloat16), "b": torch.arange(12.0).view(4, 3), "s": torch.tensor(2.5)}
    file = str(tmp_path / "w.safetensors")
    save_file(tensors, file)
    assert torch.equal(meta.read_rows(file, "a", 1, 3), tensors["a"][1:4])
    assert meta.read_rows(file, "a", 1, 3).dtype == torch.bfloat16
    assert torch.equal(meta.read_rows(file, "b", 3, 1), tensors["b"][3:4])
    assert meta.read_rows(file, "b", 4, 0).shape == (0, 3)
    assert torch.equal(meta.read_rows(file, "b"), tensors["b"]) and torch.equal(meta.read_rows(file, "s"), tensors["s"])


def test_meta_build_fills_the_weights_a_normal_build_loads(tiny_lm_dir, tiny_clip_dir, tmp_path):
    cfg = _cfg(tiny_lm_dir, tiny_clip_dir)
    real, lazy = _build(cfg, lazy=False), _build(cfg, lazy=True)
    assert all(p.is_meta for p in [*lazy.lm.parameters(), *lazy.vision.parameters()])
    assert not any(p.is_meta for p in lazy.bridge.parameters())  # fresh, from the same seed
    assert not any(b.is_meta for b in lazy.buffers())  # rotary frequencies and position ids are computed
    for model in (real, lazy):  # adapters injected into meta layers keep their initial values
        torch.manual_seed(5)
        add_lora(model.lm, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    # trained weights of a run (one LM matrix among them) over the pretrained ones: a meta one is read later
    lm_key = "lm.model.layers.1.mlp.up_proj.weight"
    with torch.no_grad():
        real.get_parameter(lm_key).mul_(-2.0)
        next(real.bridge.parameters()).add_(1.0)
    keys = {lm_key, *("bridge." + n for n, _ in real.bridge.named_parameters())}
    ckpt.save_weights(real, keys, tmp_path / "run", {"keys": sorted(keys), "lora": None})
    ckpt.load_weights(lazy, tmp_path / "run")
    assert lazy.get_parameter(lm_key).is_meta  # tagged, not read
    fill_from_files(lazy, torch.device("cpu"))
    assert not meta.has_meta(lazy)
    assert lazy.lm.lm_head.weight is lazy.lm.model.embed_tokens.weight  # still tied
    a, b = real.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for (name, x), (_, y) in zip(real.named_buffers(), lazy.named_buffers()):
        assert torch.equal(x, y), name
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    torch.testing.assert_close(lazy.lm(ids).logits, real.lm(ids).logits, rtol=0, atol=0)


def test_adapters_made_on_the_meta_device_get_the_values_peft_gives():
    """peft's `low_cpu_mem_usage` creates the adapters on the meta device; `init_adapters` gives them the values
    (and leaves the generator where) a plain injection would: the same draws in the same order."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    base = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 6), "k_proj": nn.Linear(8, 8)})
    plain, lazy = copy.deepcopy(base), copy.deepcopy(base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(5)
    inject_adapter_in_model(config, plain)
    after_plain = torch.rand(4)
    torch.manual_seed(5)
    inject_adapter_in_model(config, lazy, low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in lazy.named_parameters() if "lora_" in n)
    meta.init_adapters(lazy, config.init_lora_weights)
    assert torch.equal(torch.rand(4), after_plain)
    a, b = plain.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- two gloo ranks against one process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_lm_dir(tmp_path_factory, tokenizer) -> tuple[str, int]:
    """A 32-layer Llama (~0.56 GB in fp32) with SmolLM2's tokenizer: large enough that holding it shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=384,
        intermediate_size=3072,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("big_llama")
    model = LlamaForCausalLM(cfg)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder), size


def test_fsdp_ranks_hold_less_than_the_whole_model_and_give_its_losses(big_lm_dir, tiny_clip_dir, world, tmp_path):
    lm_dir, model_bytes = big_lm_dir
    data = tiny_recipe_dict(lm_dir, tiny_clip_dir, world["root"])
    data["stages"][0].update(steps=1, batch_size=2)  # one sample per rank: the weights, not activations, dominate
    data["stages"][1].update(steps=1, batch_size=2, data={"world/train/caption": 1.0})
    data.update(threads=1, save_every=0)
    # glibc's malloc raises its mmap threshold as large blocks are freed, then keeps FSDP's freed all-gather
    # buffers in its heap (resident memory grew 2.5x in 4 CPU steps); a fixed threshold returns them, for both runs
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": str(ROOT),
    }  # the probe is a script: import this checkout's mmbridge
    probe = [str(ROOT / "tests" / "fsdp_probe.py")]
    runs = {}
    for strategy, launch in (
        ("none", [sys.executable]),
        ("fsdp", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
    ):
        recipe = tmp_path / f"{strategy}.yaml"
        recipe.write_text(yaml.safe_dump({**data, "strategy": strategy}, sort_keys=False))
        out = tmp_path / strategy
        proc = subprocess.run(
            [*launch, *probe, str(recipe), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[strategy] = out
    whole = json.loads((runs["none"] / "rss0.json").read_text())
    ranks = [json.loads((runs["fsdp"] / f"rss{r}.json").read_text()) for r in (0, 1)]
    print(json.dumps({"model_mib": model_bytes / 2**20, "one_process": whole, "fsdp_ranks": ranks}))
    for rank in ranks:  # before: every rank built the whole model and deep-copied it per stage
        assert rank["peak_kib"] * 1024 < whole["peak_kib"] * 1024 - model_bytes / 8, (rank, whole, model_bytes)
    got, want = (
        [json.loads(x) for x in (runs[s] / "metrics.jsonl").read_text().splitlines()] for s in ("fsdp", "none")
    )
    assert len(want) == 2 and [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert_same_losses(got, want)  # rounding's bound, as for the other process-count comparisons
    saved = load_file(str(runs["fsdp"] / "model" / "model.safetensors"))
    gathered = load_file(str(runs["fsdp"] / "bridge.safetensors"))  # `Dist.part` on the sharded model
    assert gathered.keys() == {k[len("bridge.") :] for k in saved if k.startswith("bridge.")}
    for k, v in gathered.items():
        assert torch.equal(v, saved["bridge." + k]), k
