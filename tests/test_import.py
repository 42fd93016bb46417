"""`mmbridge import` of a LLaVA folder built from a config (list-only chat template, padded vocabulary), and
`model.init`: the imported run loads, chats, evaluates and trains further, and builds start from run weights."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmbridge.cli import main as cli
from mmbridge.config import recipe_from_dict, recipe_to_dict
from mmbridge.data.images import preprocess
from mmbridge.interop.llava_import import LlavaImportError, import_llava
from mmbridge.models.build import build_model
from mmbridge.runs import load_run, read_recipe
from mmbridge.train.trainer import Trainer
from tests.greedy_reference import greedy_answers, vqa_accuracy_by_hand

# LLaVA-1.5's template (llava-hf): it iterates content parts, so it cannot render plain strings itself
LLAVA15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tokenizer):
    """A LLaVA-1.5-shaped folder: CLIP tower, Linear-GELU-Linear projector, Llama with a padded vocabulary."""
    import copy

    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.pad_token = tok.eos_token
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tok) + 63,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(4)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # a projector far from its initialisation
        model.model.multi_modal_projector.linear_1.bias.normal_()
    folder = tmp_path_factory.mktemp("llava15") / "llava"
    model.save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "run"
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        cli(["import", str(llava_dir), str(out)])
    (out.parent / "said.txt").write_text(said.getvalue())
    return out


def square(n: int) -> list[Image.Image]:
    g = torch.Generator().manual_seed(n)
    return [
        Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)
    ]


def test_imported_run_layout(imported):
    for name in ("vision", "lm", "tokenizer", "model"):
        assert (imported / name / "manifest.json").is_file(), name
    recipe = read_recipe(imported)
    assert recipe.model.vision == {
        "name": "hf",
        "path": str((imported / "vision").resolve()),
        "feature_layer": -2,
        "drop_cls": True,
    }
    assert recipe.model.bridge == {"name": "mlp", "depth": 2}
    assert recipe.model.lm["path"] == str((imported / "lm").resolve())
    said = (imported.parent / "said.txt").read_text()
    assert "resizes the shortest edge and center-crops" in said  # where our preprocessing differs, said
    meta = json.loads((imported / "model" / "meta.json").read_text())
    assert meta["keys"] == ["bridge.proj.0.bias", "bridge.proj.0.weight", "bridge.proj.2.bias", "bridge.proj.2.weight"]


@pytest.mark.parametrize("n", [1, 2])
def test_imported_llava_gives_the_same_logits_and_ids(llava_dir, imported, n):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(llava_dir)).eval()
    hp = AutoProcessor.from_pretrained(str(llava_dir))
    model, processor = load_run(imported, device="cpu")
    ids = torch.tensor([processor.encode_prompt([{"from": "human", "value": "<image>\n" * n + "Describe it."}])])
    content = [{"type": "image"}] * n + [{"type": "text", "text": "Describe it."}]
    text = hp.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert hp(text=text, images=square(n), return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    pixels = preprocess(square(n), processor.image_size, processor.image_mean, processor.image_std)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
        got = model.lm.get_output_embeddings()(model(ids, torch.ones_like(ids), pixels).hidden_states)
    assert got.shape == want.shape  # the padded vocabulary is kept (its rows are not an export's zero rows)
    assert (got - want).abs().max() < 1e-5


def test_chat_and_eval_read_the_imported_run(imported, world, tmp_path):
    image = tmp_path / "photo.png"
    square(1)[0].save(image)
    answer = cli(
        ["chat", str(imported), "--image", str(image), "What is it?", "--max-new-tokens", "4", "--device", "cpu"]
    )
    model, proc = load_run(imported, device="cpu")
    prompt = proc.encode_prompt([{"from": "human", "value": "<image>\nWhat is it?"}])
    pixels = preprocess(square(1), proc.image_size, proc.image_mean, proc.image_std)
    assert answer == greedy_answers(model, proc, [prompt], pixels, 4)[0]  # the imported weights' own answer
    # one record per batch, so each prediction is one prompt's decoding (the first two questions share an image)
    cli(
        [
            "eval",
            str(imported),
            "--data",
            world["manifest"]["test"]["vqa"],
            "--images",
            world["images"],
            "--task",
            "vqa",
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--batch-size",
            "1",
            "--out",
            str(tmp_path / "m.json"),
            "--device",
            "cpu",
        ]
    )
    rows = [json.loads(x) for x in (tmp_path / "m.predictions.jsonl").read_text().splitlines()]
    records = json.loads(Path(world["manifest"]["test"]["vqa"]).read_text())[:2]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for row, record in zip(rows, records):
        prompt = proc.encode_prompt(record["conversations"][:1])
        pixels = preprocess(
            [Image.open(Path(world["images"]) / record["image"])], proc.image_size, proc.image_mean, proc.image_std
        )
        assert row["prediction"] == greedy_answers(model, proc, [prompt], pixels, 2)[0]
        assert row["gold"] == record["answer"]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 2
    assert metrics["vqa_accuracy"] == vqa_accuracy_by_hand(
        [r["prediction"] for r in rows], [r["answer"] for r in records]
    )


def test_model_init_trains_further_and_chains(imported, world, tmp_path):
    base, _ = load_run(imported, device="cpu")
    data = recipe_to_dict(read_recipe(imported))
    data["model"]["init"] = str(imported)
    data["world"] = {"root": world["root"], "n_train": 40, "n_val": 8, "n_test": 8, "seed": 0, "image_size": 32}
    data["stages"] = [
        {
            "name": "lora",
            "data": {"world/train/vqa": 1.0},
            "train": {"lm": "lora"},
            "lr": {"lm": 1e-2},
            "lora": {"r": 4, "alpha": 8},
            "steps": 2,
            "batch_size": 2,
        }
    ]
    Trainer(recipe_from_dict(data), tmp_path / "further", progress=False).run()
    further, _ = load_run(tmp_path / "further", device="cpu")
    for k, v in base.bridge.state_dict().items():  # the bridge came from the imported run, untouched
        assert torch.equal(further.bridge.state_dict()[k], v)
    lora = {k: v for k, v in further.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().max() > 0 for v in lora.values())
    # a build from the further-trained run gets its LoRA and, through its own model.init, the imported bridge
    chained = recipe_from_dict({"name": "c", "model": {**data["model"], "init": str(tmp_path / "further")}})
    model, _ = build_model(chained.model)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in further.state_dict().items())


def test_model_init_must_be_a_run(imported, tmp_path):
    data = recipe_to_dict(read_recipe(imported))
    data["model"]["init"] = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.init"):
        build_model(recipe_from_dict(data).model)


def test_import_refuses_what_mmbridge_cannot_hold(llava_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llava_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["vision_feature_layer"] = [-2, -1]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlavaImportError, match="vision_feature_layer"):
        import_llava(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (bad / "config.json").write_text(json.dumps({**config, "vision_feature_layer": -2}))
    weights = load_file(str(bad / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "linear_2" not in k}, str(bad / "model.safetensors"))
    with pytest.raises(LlavaImportError, match="linear_2"):  # a projector layer missing from the weights
        import_llava(bad, tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        cli(["import", str(tmp_path), str(tmp_path / "out")])  # no config.json
    assert e.value.code == 2 and "config.json" in capsys.readouterr().err
