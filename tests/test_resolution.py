"""Resolution per stage: the position table interpolated once, the processor following, resume and load_run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmbridge.config import RecipeError, recipe_from_dict
from mmbridge.models.resolution import interpolate_positions
from mmbridge.models.vision import build_vision_encoder
from mmbridge.runs import load_run
from mmbridge.train.trainer import Trainer
from tests.conftest import interrupted_run, tiny_recipe_dict


def test_interpolated_table_equals_f_interpolate_of_the_old_one():
    torch.manual_seed(0)
    table = torch.randn(1 + 16, 8)
    new = interpolate_positions(table, 1, (6, 6))
    want = (
        F.interpolate(
            table[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(6, 6), mode="bicubic", align_corners=False
        )
        .permute(0, 2, 3, 1)
        .reshape(36, 8)
    )
    assert torch.equal(new[0], table[0]) and torch.equal(new[1:], want)


def test_a_resized_tower_matches_its_on_the_fly_interpolation(tiny_clip_dir):
    torch.manual_seed(0)
    resized = build_vision_encoder({"name": "hf", "path": tiny_clip_dir, "feature_layer": -1}).eval()
    before = resized.model.embeddings.position_embedding.weight.detach().clone()
    resized.resize(48)
    on_the_fly = build_vision_encoder(
        {"name": "hf", "path": tiny_clip_dir, "feature_layer": -1, "image_size": 48}
    ).eval()
    table = resized.model.embeddings.position_embedding.weight
    assert table.shape == (1 + 36, 32) and resized.grid == (6, 6) and resized.num_tokens == 36
    assert torch.equal(table, interpolate_positions(before, 1, (6, 6)))
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(resized(pixels), on_the_fly(pixels), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected 48x48"):
        resized(torch.randn(1, 3, 32, 32))


def recipe_data(tiny_lm_dir, tiny_clip_dir, world):
    """Stage 1 at 32 px (a 4x4 grid: 16 tokens per image through the mlp bridge), stage 2 at 48 px (36 tokens)."""
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "mlp"})
    data["model"]["max_length"] = 200
    data["save_every"] = 2
    data["stages"][0]["steps"] = 2
    data["stages"][1].update(
        image_size=48,
        steps=5,
        train={"vision": "full", "bridge": "full", "lm": "lora"},
        lr={"vision": 1e-3, "bridge": 1e-2, "lm": 1e-2},
    )
    return data


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["stage"], r["step"]): r["loss"] for r in rows}


def test_stage_resolution_trains_resumes_and_reloads(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    recipe = recipe_from_dict(recipe_data(tiny_lm_dir, tiny_clip_dir, world))
    full = Trainer(recipe, tmp_path / "a", progress=False)
    assert full.processor.num_image_tokens == 16 and full.processor.image_size == 32
    full.run()
    assert full.processor.num_image_tokens == 36 and full.processor.image_size == 48
    table = full.model.vision.model.embeddings.position_embedding.weight
    assert table.shape[0] == 37 and table.requires_grad  # the interpolated table trained in stage 2

    interrupted_run(recipe, tmp_path / "b", 2 + 4)  # stage 2, step 4 (the last checkpoint: stage 2 step 2, 48 px)
    resumed = Trainer(recipe, tmp_path / "b", resume=True, progress=False)
    assert resumed.model.vision.image_size == 48 and resumed.processor.num_image_tokens == 36
    resumed.run()
    want, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key

    model, proc = load_run(tmp_path / "a", device="cpu")
    assert proc.image_size == 48 and proc.num_image_tokens == 36 and model.vision.grid == (6, 6)
    conv = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]
    ids, pixels = torch.tensor([proc.encode(conv, 1).input_ids]), torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(
            model(ids, pixel_values=pixels).hidden_states, full.model.eval()(ids, pixel_values=pixels).hidden_states
        )


def test_stage_resolution_errors(tiny_lm_dir, tiny_clip_dir, world, tmp_path):
    data = recipe_data(tiny_lm_dir, tiny_clip_dir, world)
    data["strategy"] = "fsdp"
    with pytest.raises(RecipeError, match="image_size"):
        recipe_from_dict(data)
    data = tiny_recipe_dict(tiny_lm_dir, tiny_clip_dir, world["root"], bridge={"name": "pool_adapter", "pooled": 4})
    data["stages"][1]["image_size"] = 40  # a 5x5 grid: pooled=4 does not divide it
    with pytest.raises(ValueError, match="not divisible by pooled=4"):
        Trainer(recipe_from_dict(data), tmp_path / "run", progress=False).train_stage(
            1, recipe_from_dict(data).stages[1]
        )
