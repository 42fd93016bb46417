"""Reading user data: LLaVA JSON errors name the file and record; skipped samples are counted."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from PIL import Image

from mmbridge.data.dataset import Collator, ConversationDataset, LengthGroupedBatches, MixtureSampler
from mmbridge.data.llava import DataError, read_llava_json
from tests.test_processor import make


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def rec(i, image="a.png", question="<image>\nWhat is it?", answer="a circle"):
    return {
        "id": f"r{i}",
        "image": image,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    return tmp_path


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"id": "x",\n  "conversations": [}\n]')
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 3"):
        read_llava_json(path)


def test_placeholder_count_mismatch_names_record(tmp_path):
    path = write(tmp_path, [rec(0), rec(1, question="no placeholder here")])
    with pytest.raises(DataError, match=r"record 1 \(id r1\): 0 <image> placeholder\(s\) but 1 image"):
        read_llava_json(path)
    records, skipped = read_llava_json(path, skip_bad=True)
    assert [r["id"] for r in records] == ["r0"] and skipped == {"<image> count mismatch": 1}


def test_structural_errors(tmp_path):
    bad = [
        {"id": "e", "image": "a.png", "conversations": []},
        {"id": "n", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "t", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
    ]
    for r, msg in zip(bad, ["non-empty list", "no 'gpt' turn", r"conversations\[0\] must be"]):
        with pytest.raises(DataError, match=msg):
            read_llava_json(write(tmp_path, [r]))
    _, skipped = read_llava_json(write(tmp_path, bad), skip_bad=True)
    assert skipped == {"no conversations": 1, "no answer turn": 1, "bad turn": 1}


def test_missing_and_corrupt_images(tokenizer, images, tmp_path):
    path = write(tmp_path, [rec(0), rec(1, image="missing.png"), rec(2, image="broken.png")])
    proc = make(tokenizer)
    strict = ConversationDataset(path, images, proc)
    assert strict[0]["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(DataError, match=r"record 1 \(id r1\).*missing\.png"):
        strict[1]
    with pytest.raises(DataError, match=r"record 2 \(id r2\).*broken\.png"):
        strict[2]
    lenient = ConversationDataset(path, images, proc, skip_bad=True)
    batch = Collator(proc)([lenient[i] for i in range(3)])
    assert batch["ids"] == ["r0"] and batch["skipped"] == Counter({"unreadable image": 2})


def test_too_long_samples_error_or_are_counted(tokenizer, images, tmp_path):
    long_q = "<image>\n" + "why? " * 200
    path = write(tmp_path, [rec(0), rec(1, question=long_q, answer="because")])
    proc = make(tokenizer, n=4, max_length=64)
    # the image fits but no answer token does: the sample cannot be kept
    with pytest.raises(DataError, match=r"record 1 \(id r1\): exceeds max_length=64"):
        ConversationDataset(path, images, proc)
    ds = ConversationDataset(path, images, proc, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == Counter({"too long (no answer fits)": 1})


def test_mixture_sampler_is_deterministic_resumable_and_weighted():
    s = MixtureSampler([10, 30], [3.0, 1.0], seed=5, chunk=64)
    stream = list(islice(iter(s), 300))
    assert stream == list(islice(iter(MixtureSampler([10, 30], [3.0, 1.0], seed=5, chunk=64)), 300))
    resumed = list(islice(iter(MixtureSampler([10, 30], [3.0, 1.0], seed=5, start=137, chunk=64)), 163))
    assert resumed == stream[137:]
    frac_first = np.mean(np.array(stream) < 10)
    assert abs(frac_first - 0.75) < 0.07
    # within a dataset, each pass is a permutation: the first 10 draws of dataset 0 cover it exactly once
    first = [i for i in stream if i < 10][:10]
    assert sorted(first) == list(range(10))
    assert list(islice(iter(MixtureSampler([10, 30], [3.0, 1.0], seed=6, chunk=64)), 300)) != stream


def test_length_grouped_batches_cut_padding_and_resume_exactly():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=500).tolist()
    mix = {"sizes": [500], "weights": [1.0], "seed": 3}
    grouped = list(islice(iter(LengthGroupedBatches(lengths, mix, batch_size=8, window=16)), 64))
    plain = [list(islice(iter(MixtureSampler(**mix)), i * 8, i * 8 + 8)) for i in range(64)]

    def padded(batches):
        return sum(8 * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.75 * padded(plain)
    # the same samples are seen, only regrouped, window by window
    assert sorted(sum(grouped[:16], [])) == sorted(sum(plain[:16], []))
    resumed = list(islice(iter(LengthGroupedBatches(lengths, mix, batch_size=8, window=16, start=21)), 43))
    assert resumed == grouped[21:]


def test_mixture_blocks_need_no_history():
    """Block k is computed from k alone: its dataset counts add up to drawn_before, far positions
    resume exactly, and each dataset's draws walk its permutations in order."""
    s = MixtureSampler([7, 50, 3], [1.0, 2.5, 0.5], seed=11, chunk=32)
    stream = list(islice(iter(s), 32 * 40))
    labels = np.searchsorted(s.offsets, stream, side="right") - 1
    for k in (0, 1, 17, 40):
        assert (np.bincount(labels[: 32 * k], minlength=3) == s.drawn_before(k)).all()
    # exact proportions, to within one draw per dataset
    assert np.abs(s.drawn_before(10**6) - 32 * 10**6 * s.probs).max() <= 1
    far = 32 * 10**6 + 5
    resumed = list(islice(iter(MixtureSampler([7, 50, 3], [1.0, 2.5, 0.5], seed=11, chunk=32, start=far)), 59))
    assert resumed == s.block(10**6)[5:].tolist() + s.block(10**6 + 1)[:32].tolist()
    # dataset 0 is read pass after pass, each pass a permutation of its 7 samples
    first = [i for i in stream if i < 7][:21]
    assert all(sorted(first[j : j + 7]) == list(range(7)) for j in (0, 7, 14))
