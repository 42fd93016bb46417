"""image_reliance: the answer loss with each record's own image vs its neighbour's."""

import pytest
import torch

from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.data.llava import read_llava_json
from mmbridge.eval.reliance import image_reliance
from mmbridge.models.build import build_model


def test_image_reliance_own_loss_gap_and_blind_model(tiny_recipe, world):
    torch.manual_seed(0)
    model, proc = build_model(tiny_recipe.model)
    path = world["manifest"]["test"]["vqa"]
    every = read_llava_json(path)[0]
    pick = [0, 1, next(i for i, r in enumerate(every) if r["image"] != every[0]["image"])]
    pick += [next(i for i, r in enumerate(every) if r["image"] not in {every[j]["image"] for j in pick})]
    pick += [pick[-1] + 1, 2]  # images A A B C C A: the wrong images are then B B C A A B
    records = [every[i] for i in pick]
    assert records[4]["image"] == records[3]["image"]
    got = image_reliance(model, proc, records, world["images"], batch_size=4)  # batches of 4 and 2
    ds = ConversationDataset(path, world["images"], proc)
    b = Collator(proc)([ds[i] for i in pick])
    with torch.no_grad():
        direct = float(model(b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"]).loss)
        wrong_of = torch.tensor([2, 2, 3, 0, 0, 2])
        wrong = float(model(b["input_ids"], b["attention_mask"], b["pixel_values"][wrong_of], b["labels"]).loss)
    assert got["answer_loss"] == pytest.approx(direct, rel=1e-5)
    assert got["answer_loss_wrong_image"] == pytest.approx(wrong, rel=1e-5)
    assert got["n"] == 6 and abs(got["image_gain"]) > 1e-5  # a random bridge: the picture changes the loss

    with torch.no_grad():  # a bridge that gives every image the same tokens: answers cannot depend on it
        model.bridge.proj[-1].weight.zero_()
    blind = image_reliance(model, proc, records, world["images"], batch_size=4)
    assert blind["image_gain"] == pytest.approx(0.0, abs=1e-6)


def test_image_reliance_needs_one_image_per_record(tiny_recipe, world):
    model, proc = build_model(tiny_recipe.model)
    records = read_llava_json(world["manifest"]["test"]["vqa"])[0][:2]
    assert records[0]["image"] == records[1]["image"]  # two questions on one picture
    with pytest.raises(ValueError, match="exactly one image"):
        image_reliance(model, proc, [records[0], {**records[1], "image": []}], world["images"])
    with pytest.raises(ValueError, match="two different images"):
        image_reliance(model, proc, records, world["images"])
