"""lmms-eval on a tiny trained run, both ways, against `mmbridge eval` on the same questions: (a) `mmbridge serve` with
lmms-eval's `openai` model, (b) lmms-eval's `mmbridge` model found through the `lmms_eval.models` entry point. Both
run lmms-eval's own CLI on a local task (`write_task`: a `datasets` folder and a YAML in a temp folder, offline).

Every answer is compared per question. The tiny LM is made to attend (its attention values scaled, as
`conftest.attentive` does), so answers follow their images: the same question about two images gets two answers,
and an image sent with the wrong question would show. The questions are those whose every greedy choice leads by
more than any evaluation order can move it (`Choices`), so batching, padding and another process cannot change an
answer on any processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import Choices, decisive_steps, one_step_run, save_tiny_llama

pytest.importorskip("lmms_eval")

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 8
PER_IMAGE = 2  # questions kept per image
TASK = "mmbridge_vqa_test"
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def attending_lm_dir(tmp_path_factory, tokenizer) -> str:
    """The tiny Llama, untied, with its attention values and outputs scaled by 6: answers that follow the image."""
    return save_tiny_llama(tmp_path_factory.mktemp("attending_llama"), tokenizer, tied=False, attention_scale=6.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, attending_lm_dir, tiny_clip_dir, world) -> Path:
    """A run trained by the real engine, one small step per stage."""
    return one_step_run(tmp_path_factory.mktemp("lmms") / "tiny-run", attending_lm_dir, tiny_clip_dir, world["root"])


@pytest.fixture(scope="module")
def loaded(run_dir):
    from mmbridge.runs import load_run

    return load_run(run_dir, device="cpu")


@pytest.fixture(scope="module")
def questions(loaded, world, tmp_path_factory) -> dict:
    """Up to PER_IMAGE test questions per image whose greedy answers, each decoded alone, have no near-tied choice;
    written as a LLaVA file. {"path", "records", "answers" (alone), "prompt_tokens"}."""
    from mmbridge.data.images import load_image
    from mmbridge.data.llava import read_llava_json
    from mmbridge.eval.records import prompt_turns

    model, proc = loaded
    records, _ = read_llava_json(world["manifest"]["test"]["vqa"])
    kept, answers, lengths, per_image = [], [], [], {}
    for r in records:
        if per_image.get(r["image"], 0) >= PER_IMAGE:
            continue
        pixels = proc.images([load_image(Path(world["images"], r["image"]))])["pixel_values"]
        prompt = proc.encode_prompt(prompt_turns(r))
        with Choices(model) as choices:
            tokens = model.generate(
                torch.tensor([prompt]),
                torch.ones(1, len(prompt), dtype=torch.long),
                pixels,
                MAX_NEW_TOKENS,
                proc.stop_token_ids,
            )[0]
        if choices.margins(decisive_steps([tokens], MAX_NEW_TOKENS))[0] <= 1:
            continue  # a near tie: another order of the same sums could choose another token
        kept.append(r)
        answers.append(proc.tokenizer.decode(tokens, skip_special_tokens=True).strip())
        lengths.append(len(prompt))
        per_image[r["image"]] = per_image.get(r["image"], 0) + 1
    path = tmp_path_factory.mktemp("questions") / "vqa.json"
    path.write_text(json.dumps(kept))
    return {"path": path, "records": kept, "answers": answers, "prompt_tokens": lengths}


@pytest.fixture(scope="module")
def mmbridge_eval(loaded, questions, world):
    from mmbridge.eval.evaluate import evaluate_file

    model, proc = loaded
    return evaluate_file(
        model, proc, questions["path"], world["images"], "vqa", max_new_tokens=MAX_NEW_TOKENS, progress=False
    )


@pytest.fixture(scope="module")
def task_dir(questions, world, tmp_path_factory) -> Path:
    from mmbridge.interop.lmms.task import write_task

    out = tmp_path_factory.mktemp("task") / "tasks"
    write_task(out, questions["path"], world["images"], name=TASK, max_new_tokens=MAX_NEW_TOKENS)
    return out


@pytest.fixture(scope="module")
def lmms_runs(run_dir, task_dir, tmp_path_factory) -> dict:
    """lmms-eval's CLI both ways at once: {"serve": (score, answers, samples), "plugin": (...)}."""
    from mmbridge.interop.lmms import harness

    work = tmp_path_factory.mktemp("lmms_eval")
    entry = harness.entry_point_dir(work / "entry", harness.declared_entry_points(ROOT / "pyproject.toml"))
    env = harness.base_env([ROOT, entry])
    env["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
    key = "test-key"
    plugin_args = f"run={run_dir},device=cpu"
    plugin = harness.lmms_eval_argv("mmbridge", plugin_args, task_dir, TASK, work / "plugin", batch_size=16)
    with harness.served(run_dir, key, env, work / "serve.log") as url:
        # the openai model reads its server and key from the environment, as its docs say
        openai = harness.lmms_eval_argv("openai", "model=tiny-run,num_concurrent=4", task_dir, TASK, work / "serve")
        procs = {
            "serve": harness.start_lmms_eval(
                openai, {**env, "OPENAI_API_BASE": url, "OPENAI_API_KEY": key}, work / "serve-eval.log", work
            ),
            "plugin": harness.start_lmms_eval(plugin, env, work / "plugin-eval.log", work),
        }
        harness.finish_all(procs, {n: work / f"{n}-eval.log" for n in procs}, TIMEOUT_S)
    return {name: harness.read_output(work / name, TASK) for name in procs}


def test_the_questions_tell_images_apart(questions):
    """The test's premise: some question asked about several images gets different answers, so an answer computed on
    the wrong image would not match."""
    by_text: dict[str, set[str]] = {}
    for r, a in zip(questions["records"], questions["answers"]):
        by_text.setdefault(r["conversations"][0]["value"], set()).add(a)
    assert len(questions["records"]) >= 8, "too few questions without a near tie"
    assert any(len(answers) > 1 for answers in by_text.values()), by_text
    assert len(set(questions["answers"])) >= len(questions["answers"]) // 3, questions["answers"]


def test_mmbridge_eval_answers_each_question_as_alone(mmbridge_eval, questions):
    metrics, rows = mmbridge_eval
    assert [r["prediction"] for r in rows] == questions["answers"]
    assert metrics["n"] == len(questions["records"])


@pytest.mark.parametrize("way", ["serve", "plugin"])
def test_lmms_eval_agrees_with_mmbridge_eval(way, lmms_runs, mmbridge_eval, questions):
    metrics, rows = mmbridge_eval
    score, answers, samples = lmms_runs[way]
    assert sorted(answers) == list(range(len(rows))), f"lmms-eval ({way}) answered docs {sorted(answers)}"
    for doc_id, row in enumerate(rows):  # the task's documents are the file's records, in order
        assert samples[doc_id]["input"] == row["question"].removeprefix("<image>\n"), doc_id
        assert answers[doc_id] == row["prediction"], (way, row["id"], answers[doc_id], row["prediction"])
    assert score == metrics["vqa_accuracy"]
    if way == "serve":  # the server's usage: each prompt as long as mmbridge's own encoding of that question
        got = [samples[d]["token_counts"][0]["input_tokens"] for d in range(len(rows))]
        assert got == questions["prompt_tokens"]


def test_the_simple_protocol_gives_the_same_answers(run_dir, task_dir, questions):
    """`--force_simple`'s class on lmms-eval-shaped requests over the task's own documents (in process)."""
    from datasets import load_from_disk

    from mmbridge.interop.lmms.model import MMBridgeSimple
    from mmbridge.interop.lmms.task import doc_to_text, doc_to_visual

    docs = load_from_disk(str(task_dir / "data"))
    model = MMBridgeSimple(run=str(run_dir), device="cpu", batch_size=5)
    model.task_dict = {TASK: docs}
    gen = {"max_new_tokens": MAX_NEW_TOKENS, "until": [], "do_sample": False}

    class Request:
        def __init__(self, doc_id):
            self.args = (doc_to_text(docs["test"][doc_id]), gen, doc_to_visual, doc_id, TASK, "test")

    out = model.generate_until([Request(d) for d in range(len(docs["test"]))])
    assert [o.text for o in out] == questions["answers"]


def test_sampling_and_log_likelihood_are_refused(run_dir):
    from mmbridge.interop.lmms.model import MMBridgeChat, _settings

    with pytest.raises(NotImplementedError, match="do_sample"):
        _settings({"do_sample": True, "temperature": 0.7})
    with pytest.raises(NotImplementedError, match="temperature"):
        _settings({"temperature": 0.7})
    assert _settings({"temperature": 0.7, "do_sample": False, "until": "\n\n"}) == (24, ("\n\n",))
    with pytest.raises(ValueError, match="run="):
        MMBridgeChat()
    with pytest.raises(TypeError, match="pretrained"):
        MMBridgeChat(run=str(run_dir), pretrained="x")
    with pytest.raises(NotImplementedError, match="mmbridge eval --task choice"):
        MMBridgeChat.loglikelihood(None, [])


def test_write_task_names_what_it_cannot_ask(tmp_path, world):
    from mmbridge.interop.lmms.task import TaskError, write_task

    base = {"id": "q", "image": "test/test_00000.png", "answer": "1"}
    bad = {  # what the error must say: the field, and why
        r"'conversations\[0\]\.value': expected its 1 <image> token\(s\) first": [
            {"from": "human", "value": "How many?\n<image>"},
            {"from": "gpt", "value": "1"},
        ],
        "'conversations': expected one question and its answer, got 3 turns": [
            {"from": "human", "value": "<image>\nHow many?"},
            {"from": "gpt", "value": "1"},
            {"from": "human", "value": "And now?"},
            {"from": "gpt", "value": "2"},
        ],
    }
    for i, (want, conv) in enumerate(bad.items()):
        data = tmp_path / f"bad{i}.json"
        data.write_text(json.dumps([{**base, "conversations": conv}]))
        with pytest.raises(TaskError, match=want):
            write_task(tmp_path / f"out{i}", data, world["images"])
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{**base, "conversations": list(bad.values())[1][:2]}]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(TaskError, match="not empty"):
        write_task(tmp_path / "full", good, world["images"])
    with pytest.raises(TaskError, match="name"):
        write_task(tmp_path / "named", good, world["images"], name="a,b")


def test_the_entry_point_names_the_manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    from mmbridge.interop.lmms import CHAT_CLASS, SIMPLE_CLASS, manifest
    from mmbridge.interop.lmms.harness import declared_entry_points

    assert declared_entry_points(ROOT / "pyproject.toml") == {"mmbridge": "mmbridge.interop.lmms:manifest"}
    m = manifest()
    assert isinstance(m, ModelManifest) and (m.chat_class_path, m.simple_class_path) == (CHAT_CLASS, SIMPLE_CLASS)
