"""`mmbridge export` / `mmbridge import` / `model.init`: a trained run leaves for stock transformers (LLaVA) with
the same tokens, pixels, logits and greedy generations, and a LLaVA folder enters as a run (tiny models, offline)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmbridge.cli import main as cli
from mmbridge.config import recipe_from_dict
from mmbridge.data.images import preprocess
from mmbridge.interop.export import ExportError, export_run, layout
from mmbridge.interop.fastvlm import CUT_RANGE
from mmbridge.interop.llava_import import import_llava
from mmbridge.interop.merge import merge_lora
from mmbridge.models.build import build_model
from mmbridge.runs import load_run, save_recipe
from mmbridge.train.checkpoint import save_weights
from mmbridge.train.trainer import Trainer
from tests.conftest import Choices, tiny_recipe_dict
from tests.rounding import assert_same_math

QUESTION = "What is shown?"


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Llama with untied embeddings and large weights (varied greedy tokens), SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("untied_llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory, lm_dir, tiny_clip_dir, world):
    """A trained run: CLIP tower, mlp bridge, then mlp + LoRA on q/v (unmerged in RUN/model)."""
    data = tiny_recipe_dict(lm_dir, tiny_clip_dir, world["root"], bridge={"name": "mlp"})
    data["model"]["system_prompt"] = "Answer briefly."
    data["stages"][1]["lr"] = {"bridge": 1e-2, "lm": 5e-2}
    folder = tmp_path_factory.mktemp("export") / "run"
    Trainer(recipe_from_dict(data), folder, progress=False).run()
    return folder


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "llava"
    cli(["export", str(run), str(out)])  # through the CLI, as a user would
    return out


@pytest.fixture(scope="module")
def hf(exported):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(str(exported), output_loading_info=True)
    return model.eval(), AutoProcessor.from_pretrained(str(exported)), info


@pytest.fixture(scope="module")
def ours(run):
    return load_run(run, device="cpu")


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    return [Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 45 - 5 * i, 3), dtype=np.uint8)) for i in range(n)]


def hf_inputs(processor, n: int, parts: bool = True):
    content = [{"type": "image"}] * n + [{"type": "text", "text": QUESTION}] if parts else "<image>\n" * n + QUESTION
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=text, images=images(n), return_tensors="pt")


def our_inputs(processor, n: int):
    ids = torch.tensor([processor.encode_prompt([{"from": "human", "value": "<image>\n" * n + QUESTION}])])
    pixels = preprocess(images(n), processor.image_size, processor.image_mean, processor.image_std)
    return ids, pixels


def our_logits(model, ids, pixels):
    with torch.no_grad():
        hidden = model(ids, torch.ones_like(ids), pixels).hidden_states
        return model.lm.get_output_embeddings()(hidden)


def test_export_is_a_stock_llava_folder(exported, hf, ours):
    model, processor, info = hf
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert all(not v for k, v in info.items()), info  # no missing, unexpected or mismatched keys
    files = os.listdir(exported)
    assert not [f for f in files if f.endswith(".py")]
    config = json.loads((exported / "config.json").read_text())
    assert "auto_map" not in config and config["vision_feature_select_strategy"] == "default"
    assert config["vision_feature_layer"] == -2 and config["image_seq_length"] == 16
    assert config["text_config"]["vocab_size"] == ours[0].lm.config.vocab_size + 1  # the image token's row
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours[1].stop_token_ids and gen["do_sample"] is False
    assert gen["suppress_tokens"] == [ours[1].image_token_id]
    assert not model.get_input_embeddings().weight[ours[1].image_token_id].any()


@pytest.mark.parametrize("n", [1, 2])
def test_processor_gives_our_ids_and_pixels(hf, ours, n):
    _, processor, _ = hf
    ids, pixels = our_inputs(ours[1], n)
    for parts in (True, False):  # one template for list-of-parts and plain-string contents
        enc = hf_inputs(processor, n, parts)
        assert enc["input_ids"].tolist() == ids.tolist()
        assert torch.equal(enc["pixel_values"], pixels)
    assert "Answer briefly." in processor.tokenizer.decode(ids[0])  # the recipe's system prompt


@pytest.mark.parametrize("n", [1, 2])
def test_logits_match_with_merged_lora(hf, ours, lm_dir, n):
    model, _, _ = hf
    ids, pixels = our_inputs(ours[1], n)
    want = our_logits(ours[0], ids, pixels)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    assert_same_math(got[..., : want.shape[-1]], want)  # merged LoRA: the same sums, grouped otherwise
    # the merged LoRA really changed the exported weights
    base = load_file(os.path.join(lm_dir, "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    merged = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert (merged - base).abs().max() > 1e-3


def test_greedy_generation_matches(hf, ours):
    model, processor, _ = hf
    for n in (1, 2):
        ids, pixels = our_inputs(ours[1], n)
        with Choices(ours[0]) as choices:  # 10 tokens: the 12th choice of the one-image reply is near a tie
            want = ours[0].generate(
                ids, torch.ones_like(ids), pixels, max_new_tokens=10, eos_token_ids=ours[1].stop_token_ids
            )[0]
        choices.assert_clear()  # merging LoRA regroups the sums: no near-tie that could flip
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=10
        )[0, ids.shape[1] :].tolist()
        got = [t for t in out if t not in ours[1].stop_token_ids and t != processor.tokenizer.pad_token_id]
        assert got == want
        assert len(set(want)) > 2  # a real sequence, not one repeated token


def test_export_import_round_trip_is_bitwise(exported, run, tmp_path):
    imported = tmp_path / "imported"
    import_llava(exported, imported, say=lambda *a: None)
    (a, pa), (b, pb) = load_run(run, device="cpu"), load_run(imported, device="cpu")
    merge_lora(a.lm)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert pa.encode_prompt([{"from": "human", "value": "<image>\nhi"}]) == pb.encode_prompt(
        [{"from": "human", "value": "<image>\nhi"}]
    )
    again = tmp_path / "again"
    export_run(imported, again, say=lambda *a: None)
    x, y = load_file(str(exported / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert (exported / "chat_template.jinja").read_text() == (again / "chat_template.jinja").read_text()


def test_existing_output_folder_is_refused(run, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        cli(["export", str(run), str(tmp_path / "busy")])
    assert e.value.code == 2 and "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def write_run(model, processor, recipe, folder):
    """A run directory without training: recipe, tokenizer and the (random) bridge, with the project's writers."""
    folder.mkdir(parents=True)
    save_recipe(recipe, folder)
    processor.tokenizer.save_pretrained(str(folder / "tokenizer"))
    keys = {k for k, _ in model.bridge.named_parameters(prefix="bridge")}
    save_weights(model, keys, folder / "model", {"keys": sorted(keys), "lora": None, "stage": 1, "step": 0})
    return folder


def tower_dir(kind: str, folder) -> str:
    """A tiny SigLIP or DINOv2 tower saved like a real checkpoint (32 px, 8 px patches)."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(2)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    model = {
        "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(intermediate_size=64, **small)),
        "dinov2": lambda: Dinov2Model(Dinov2Config(mlp_ratio=2, **small)),
        "dinov2_reg": lambda: Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **small)
        ),
    }[kind]()
    model.save_pretrained(folder)
    return str(folder)


def model_recipe(vision: dict, bridge: dict, lm_path: str, **extra):
    return recipe_from_dict(
        {
            "name": "t",
            "model": {"vision": vision, "bridge": bridge, "lm": {"path": lm_path}, "max_length": 160, **extra},
        }
    )


@pytest.mark.parametrize(
    "kind,vision,strategy,tokens",
    [
        ("siglip", {"feature_layer": -1}, "full", 16),  # no CLS: nothing to drop
        ("dinov2", {"feature_layer": -1}, "default", 16),  # the last layer (LayerNorm'd in both)
        ("clip", {"feature_layer": 1, "drop_cls": False}, "full", 17),  # CLS kept; a positive layer index
    ],
)
def test_other_towers_export_with_equal_logits(kind, vision, strategy, tokens, tiny_lm_dir, tiny_clip_dir, tmp_path):
    """(With conftest's Llama, whose embeddings are tied: the exported lm_head is the padded embedding.)"""
    from transformers import AutoModelForImageTextToText

    path = tiny_clip_dir if kind == "clip" else tower_dir(kind, tmp_path / kind)
    recipe = model_recipe({"name": "hf", "path": path, **vision}, {"name": "mlp"}, tiny_lm_dir)
    torch.manual_seed(3)
    model, processor = build_model(recipe.model)
    run = write_run(model, processor, recipe, tmp_path / "run")
    export_run(run, tmp_path / "out", say=lambda *a: None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["vision_feature_select_strategy"], config["image_seq_length"]) == (strategy, tokens)
    hf_model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out")).eval()
    assert config["tie_word_embeddings"] and hf_model.lm_head.weight is hf_model.get_input_embeddings().weight
    model.eval()
    ids, pixels = our_inputs(processor, 2)
    with torch.no_grad():
        got = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
    want = our_logits(model, ids, pixels)
    assert_same_math(got[..., : want.shape[-1]], want)
    import_llava(tmp_path / "out", tmp_path / "imported", say=lambda *a: None)  # and back, tied embeddings too
    back, _ = load_run(tmp_path / "imported", device="cpu")
    assert back.num_image_tokens == tokens
    sa, sb = model.state_dict(), back.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert back.lm.lm_head.weight is back.lm.get_input_embeddings().weight


BLOCKED = [  # (model section changes, the key the error must name)
    ({"bridge": {"name": "pool_adapter", "pooled": 2}}, "model.bridge.name: pool_adapter"),
    ({"bridge": {"name": "pool_adapter", "pooled": 2, "pos_embed": True}}, "model.bridge.pos_embed"),
    ({"bridge": {"name": "mlp", "norm": True}}, "model.bridge.norm"),
    ({"bridge": {"name": "mlp", "depth": 3}}, "model.bridge.depth"),
    ({"bridge": {"name": "mlp", "l2_normalize": True}}, "model.bridge.l2_normalize"),
    ({"bridge": {"name": "linear"}}, "model.bridge.name: linear"),
    ({"bridge": {"name": "resampler", "latents": 4}}, "model.bridge.name: resampler"),
    ({"bridge": {"name": "gated_xattn", "latents": 4}}, "model.bridge.name: gated_xattn"),
    ({"bridge": {"name": "visual_expert"}}, "model.bridge.name: visual_expert"),
    ({"bridge": {"name": "qformer", "queries": 4}}, "model.bridge.name: qformer"),
    ({"vision": {"name": "efficientnet_lite0", "image_size": 80}}, "model.vision.image_size: 80"),
    (
        {"vision": {"name": "efficientnet_lite0", "image_size": 64, "feature_stage": "last_block"}},
        "model.vision.feature_stage",
    ),
    (
        {"vision": {"name": "efficientnet_lite0", "image_size": 64, "extra_stages": ["stem"]}},
        "model.vision.extra_stages",
    ),
    ({"vision": {"name": "lcl_vit", "path": "runs/lcl/encoder"}}, "model.vision.name: lcl_vit"),
    ({"vision": {"post_layernorm": True}}, "model.vision.post_layernorm"),
]


@pytest.mark.parametrize("change,key", BLOCKED, ids=[k for _, k in BLOCKED])
def test_unsupported_combinations_name_the_blocker(change, key, tiny_clip_dir, tmp_path, capsys):
    vision = {"name": "hf", "path": tiny_clip_dir, "feature_layer": -2, **change.get("vision", {})}
    if change.get("vision", {}).get("name", "hf") != "hf":
        vision = change["vision"]
    recipe = model_recipe(vision, change.get("bridge", {"name": "mlp"}), "unused-lm-path")
    run = tmp_path / "run"
    run.mkdir()
    save_recipe(recipe, run)  # refused from the recipe alone, before any weight is loaded
    with pytest.raises(ExportError, match=key.replace(".", r"\.")):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        cli(["export", str(run), str(tmp_path / "out")])
    assert e.value.code == 2 and key in capsys.readouterr().err


@pytest.mark.parametrize("case,key", [("registers", "model.vision.drop_cls"), ("size", "model.vision.image_size")])
def test_tower_settings_llava_cannot_reproduce(case, key, lm_dir, tiny_clip_dir, tmp_path):
    if case == "registers":  # drop_cls drops CLS + 2 registers; LLaVA's `default` drops exactly one token
        vision = {"name": "hf", "path": tower_dir("dinov2_reg", tmp_path / "reg"), "feature_layer": -1}
    else:  # interpolated position embeddings
        vision = {"name": "hf", "path": tiny_clip_dir, "image_size": 48}
    recipe = model_recipe(vision, {"name": "mlp"}, lm_dir)
    model, _ = build_model(recipe.model)
    with pytest.raises(ExportError, match=key.replace(".", r"\.")):
        layout(model, recipe.model)


@pytest.mark.parametrize("stage,act", [("head", "gelu"), ("block7", "sigmoid"), ("block4", "gelu")])
def test_efficientnet_lite0_exports_as_fastvlm(stage, act, lm_dir, tmp_path):
    """EfficientNet-Lite0 (the packaged ImageNet weights) as EfficientNetModel with identity squeeze-excite; a cut
    after an inner block passes its features through the stock head as ReLU6 pieces (fastvlm.cut_head, cut_projector)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    recipe = model_recipe(
        {"name": "efficientnet_lite0", "image_size": 64, "feature_stage": stage}, {"name": "mlp", "act": act}, lm_dir
    )
    torch.manual_seed(5)
    model, processor = build_model(recipe.model)
    run = write_run(model, processor, recipe, tmp_path / "run")
    export_run(run, tmp_path / "out", say=lambda *a: None)
    hf_model, info = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert type(hf_model).__name__ == "FastVlmForConditionalGeneration" and all(not v for v in info.values())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "efficientnet" and config["vision_config"]["hidden_act"] == "relu6"
    assert config["projector_hidden_act"] == act
    hf_processor = AutoProcessor.from_pretrained(str(tmp_path / "out"))
    hf_model.eval()
    model.eval()
    for n in (1, 2):
        ids, pixels = our_inputs(processor, n)
        enc = hf_inputs(hf_processor, n)
        assert enc["input_ids"].tolist() == ids.tolist() and torch.equal(enc["pixel_values"], pixels)
        with torch.no_grad():
            tower = hf_model.model.vision_tower(pixels).last_hidden_state.flatten(2).transpose(1, 2)
            feats = model.vision(pixels)
            if stage == "head":
                assert torch.equal(tower, feats)  # the same feature map, bit for bit
            else:  # the pieces give back every feature (to rounding of the pieces' sum), and the projector's output
                assert tower.shape[-1] == 1280 and feats.abs().max() < CUT_RANGE
                ours_tokens = model.bridge(feats)
                hf_tokens = hf_model.model.multi_modal_projector(tower)
                assert_same_math(hf_tokens, ours_tokens)
            got = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
        want = our_logits(model, ids, pixels)
        assert_same_math(got[..., : want.shape[-1]], want)


def test_the_bundled_exportable_recipes_export_and_the_object_tokens_say_why_not():
    """docs/guide/export-import.md: `mmbridge train exportable` then `mmbridge export` runs on this CPU, and the
    demo exports; the object-token bridge has no stock class, and the refusal names it."""
    from mmbridge.config import load_recipe
    from mmbridge.interop.export import recipe_blockers

    assert recipe_blockers(load_recipe("exportable").model) == []
    assert recipe_blockers(load_recipe("demo").model) == []
    prefixed = recipe_blockers(load_recipe("demo", ["model.modality_prefix=true"]).model)
    assert [b for b in prefixed if b.startswith("model.modality_prefix: true")] and len(prefixed) == 1
    objects = recipe_blockers(load_recipe("objects").model)
    assert any(b.startswith("model.bridge.name: objects") for b in objects)


def _kept_folder(message: str) -> Path:
    """The finished output a refused publish kept, as its message names it."""
    return Path(re.search(r"the finished output was kept in (\S+) \(", message).group(1))


@pytest.mark.parametrize("appears", ["a file in the empty folder", "an empty folder", "a folder with a file"])
def test_an_output_folder_that_changes_during_the_export_is_left_alone(run, tmp_path, monkeypatch, appears):
    """OUT was checked only at the start; at publish time whatever was there was renamed aside and deleted."""
    import mmbridge.interop.llava_processor as processor_module
    from mmbridge.interop import InteropError

    out = tmp_path / "llava"
    if appears == "a file in the empty folder":
        out.mkdir()  # an empty folder is a valid OUT; it is filled by someone else while the export runs
    real = processor_module.llava_processor

    def meanwhile(*args, **kwargs):
        out.mkdir(exist_ok=True)
        if appears != "an empty folder":
            (out / "theirs.txt").write_text("theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(processor_module, "llava_processor", meanwhile)
    with pytest.raises(InteropError, match=f"{out}: something was put there while this command ran") as err:
        export_run(run, out, say=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == ([] if appears == "an empty folder" else ["theirs.txt"])
    kept = _kept_folder(str(err.value))
    assert kept.parent == out.parent and {"config.json", "model.safetensors", "manifest.json"} <= {
        p.name for p in kept.iterdir()
    }


def test_two_exports_to_one_folder_never_touch_each_others_files(run, tmp_path, monkeypatch):
    """A second export to the same OUT removed the first one's staging folder (`.OUT.tmp`, one name for all)."""
    import mmbridge.interop.llava_processor as processor_module
    from mmbridge.interop import InteropError
    from mmbridge.train.checkpoint import verify

    out, real = tmp_path / "llava", processor_module.llava_processor
    calls = []

    def second_export_meanwhile(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first export is half written: the second runs start to end now
            export_run(run, out, say=lambda *_: None)
        return real(*args, **kwargs)

    monkeypatch.setattr(processor_module, "llava_processor", second_export_meanwhile)
    with pytest.raises(InteropError, match="something was put there") as err:
        export_run(run, out, say=lambda *_: None)
    verify(out)  # the second export, whole
    first = _kept_folder(str(err.value))
    verify(first)  # the first, whole, beside it
    assert [p.name for p in tmp_path.iterdir() if p != first] == ["llava"]


def test_the_export_check_answers_through_transformers_alone(exported, ours, world):
    """`mmbridge export --check`: the export, loaded by transformers alone, gives mmbridge's greedy answers (where no
    choice is a near tie that another order of the sums could flip)."""
    from mmbridge.interop.check import compare_with_run

    model, processor = ours[:2]
    records = [r for r in json.loads(Path(world["manifest"]["test"]["vqa"]).read_text())][:3]
    with Choices(model) as choices:
        result = compare_with_run(model, processor, exported, records, Path(world["images"]), max_new_tokens=4)
    choices.assert_clear()
    assert result["n"] == 3 and [r["question"] for r in result["rows"]] == [
        r["conversations"][0]["value"].replace("<image>", "").strip() for r in records
    ]
    assert result["agree"] == 3, result["rows"]
