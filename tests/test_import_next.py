"""`mmbridge import` of a LLaVA-NeXT folder (LlavaNextForConditionalGeneration built from a config): the run
gives transformers' own logits on non-square images, so AnyRes's grid choice, tile order, unpadding and newline
match LLaVA-NeXT's as transformers implements them."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.cli import main as cli
from mmbridge.runs import load_run, read_recipe
from tests.rounding import assert_same_math
from tests.test_import import LLAVA15

# llava-hf's pinpoints scaled to a 32-pixel tower; transformers reads them as (height, width)
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory, tokenizer):
    import copy

    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.pad_token = tok.eos_token
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=PINPOINTS,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(5)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():  # a projector far from its initialisation, a newline unlike any token
        model.model.multi_modal_projector.linear_1.bias.normal_()
        model.model.image_newline.normal_(0, 3)
    folder = tmp_path_factory.mktemp("llava_next") / "next"
    model.save_pretrained(folder)
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
    )
    LlavaNextProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA15,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported_next(next_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported_next") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        cli(["import", str(next_dir), str(out)])
    return out


@pytest.fixture(scope="module")
def both(next_dir, imported_next):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    hf = LlavaNextForConditionalGeneration.from_pretrained(str(next_dir)).eval()
    return hf, AutoProcessor.from_pretrained(str(next_dir)), *load_run(imported_next, device="cpu")


def picture(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_recipe_holds_llava_next_anyres(imported_next):
    recipe = read_recipe(imported_next)
    assert recipe.model.tiling == {
        "mode": "anyres",
        "grids": [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]],
        "newline": True,
        "global_view": True,
    }
    meta = json.loads((imported_next / "model" / "meta.json").read_text())
    assert "bridge.image_newline" in meta["keys"]


# (width, height): 64x40 (2x2, rows cut by unpad), 40x90 (tall, 3x1), 30x20 (fits every grid: the tie goes to the
# first pinpoint, which transformers reads as one row of two tiles), 50x50 (2x2, nothing cut)
@pytest.mark.parametrize("size", [(64, 40), (40, 90), (30, 20), (50, 50)])
def test_imported_llava_next_gives_transformers_logits(both, size):
    hf, hp, model, processor = both
    image = picture(*size, seed=sum(size))
    views = processor.images([image])
    ids = torch.tensor(
        [processor.encode_prompt([{"from": "human", "value": "<image>\nDescribe it."}], views["counts"])]
    )
    text = hp.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
        add_generation_prompt=True,
    )
    assert hp(text=text, images=[image], return_tensors="pt")["input_ids"].tolist() == ids.tolist()  # same count
    with torch.no_grad():  # the same views in both (ours: global view first, then the tiles row by row)
        want = hf(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=views["pixel_values"][None],
            image_sizes=torch.tensor([[size[1], size[0]]]),
        ).logits
        got = model.lm.get_output_embeddings()(
            model(ids, torch.ones_like(ids), views["pixel_values"], visual_index=views["visual_index"]).hidden_states
        )
    assert_same_math(got, want, msg=f"{size}")


def test_an_anyres_run_exports_as_llava_next(next_dir, imported_next, both, tmp_path):
    """Import then export: the folder is a LlavaNextForConditionalGeneration with the original's weights, grids
    and newline, its processor gives our pixels and ids, and its logits are the original's."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from mmbridge.interop.export import export_run

    hf, _, model, processor = both
    out = export_run(imported_next, tmp_path / "exported", say=lambda *a: None)
    again = LlavaNextForConditionalGeneration.from_pretrained(str(out)).eval()
    assert again.config.image_grid_pinpoints == PINPOINTS
    assert torch.equal(again.model.image_newline, hf.model.image_newline)
    hp = AutoProcessor.from_pretrained(str(out))
    image = picture(64, 40, seed=7)
    views = processor.images([image])
    ids = torch.tensor(
        [processor.encode_prompt([{"from": "human", "value": "<image>\nDescribe it."}], views["counts"])]
    )
    text = hp.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
        add_generation_prompt=True,
    )
    enc = hp(text=text, images=[image], return_tensors="pt")
    assert enc["input_ids"].tolist() == ids.tolist()
    assert torch.equal(enc["pixel_values"][0], views["pixel_values"])  # global view, then the tiles
    with torch.no_grad():
        got = again(**enc).logits
        want = hf(input_ids=ids, pixel_values=views["pixel_values"][None], image_sizes=enc["image_sizes"]).logits
    assert_same_math(got, want)
