"""A local lmms-eval task over a LLaVA-format VQA file, scored as `mmbridge eval --task vqa` scores it.

`write_task` saves the records as a `datasets` folder (`save_to_disk`: question, gold answers, image bytes) and
writes a task YAML beside it that loads that folder (`load_from_disk`), so lmms-eval runs it offline:

    python -m mmbridge.interop.lmms.task --data world/test/vqa.json --images world/images --out tasks/shapes
    python -m lmms_eval eval --include_path tasks/shapes --tasks mmbridge_vqa --model ... --log_samples ...

A question goes to the model as lmms-eval sends any question: its images, then its text. A record must
therefore be one question whose `<image>` tokens come first, each on its own line, as LLaVA's and the shapes
world's are; the metric is `eval/metrics.py`'s `vqa_accuracy` on each answer, averaged.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mmbridge.data.llava import read_llava_json, record_images
from mmbridge.data.media import media_path
from mmbridge.eval.metrics import vqa_accuracy
from mmbridge.eval.records import gold, prompt_turns
from mmbridge.models.language import IMAGE_TOKEN

TASK = "mmbridge_vqa"
METRIC = "vqa_accuracy"
SPLIT = "test"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class TaskError(ValueError):
    """Records or options a local lmms-eval task cannot be made from; the message names the record and field."""


def vqa_docs(records: list[dict], image_root: str | Path) -> list[dict]:
    """One lmms-eval document per record: `id`, `images` (the files' bytes), `question` (its text without the
    leading `<image>` lines), `answers` (the gold answer, or the annotators' list) and `qtype`."""
    docs = []
    for i, r in enumerate(records):
        where = f"record {i} (id {r.get('id', i)})"
        if "video" in r:
            raise TaskError(f"{where}: 'video': a local lmms-eval task holds images only")
        turns = prompt_turns(r)
        if len(turns) != 1 or turns[0]["from"] not in ("human", "user"):
            raise TaskError(
                f"{where}: 'conversations': expected one question and its answer, got {len(turns)} turns before "
                "the answer (lmms-eval asks one question per document)"
            )
        names = record_images(r)
        head = f"{IMAGE_TOKEN}\n" * len(names)
        value = turns[0]["value"]
        if not value.startswith(head) or IMAGE_TOKEN in value[len(head) :]:
            raise TaskError(
                f"{where}: 'conversations[0].value': expected its {len(names)} {IMAGE_TOKEN} token(s) first, each "
                "on its own line, then the question (lmms-eval sends a question's images before its text)"
            )
        answer = gold(r, "vqa")
        answers = [answer] if isinstance(answer, str) else list(answer)
        if not answers or not all(isinstance(a, str) for a in answers):
            raise TaskError(f"{where}: 'answer': expected a string or a non-empty list of strings, got {answer!r}")
        docs.append(
            {
                "id": str(r.get("id", i)),
                "images": [{"bytes": Path(media_path(image_root, n)).read_bytes(), "path": n} for n in names],
                "question": value[len(head) :],
                "answers": answers,
                "qtype": str(r.get("qtype") or ""),
            }
        )
    return docs


def task_yaml(name: str, data_dir: Path, max_new_tokens: int) -> str:
    """The task's YAML: greedy generation of at most `max_new_tokens` tokens, no stop strings (as `mmbridge eval`),
    the functions below by their import path."""
    here = "mmbridge.interop.lmms.task"  # by import path (not __name__: this module may run as __main__)
    return "\n".join(
        [
            f"task: {name}",
            f"dataset_path: {json.dumps(str(data_dir))}",
            "dataset_kwargs:",
            "  load_from_disk: true",
            f"test_split: {SPLIT}",
            "output_type: generate_until",
            f"doc_to_visual: !function {here}.doc_to_visual",
            f"doc_to_text: !function {here}.doc_to_text",
            "doc_to_target: answers",
            f"process_results: !function {here}.process_results",
            "generation_kwargs:",
            f"  max_new_tokens: {max_new_tokens}",
            "  temperature: 0",
            "  do_sample: false",
            "  until: []",
            "metric_list:",
            f"  - metric: {METRIC}",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 0",
            "",
        ]
    )


def write_task(
    out_dir: str | Path,
    data: str | Path,
    image_root: str | Path,
    name: str = TASK,
    limit: int | None = None,
    max_new_tokens: int = 24,
) -> Path:
    """Write the task `name` over the first `limit` records of the LLaVA file `data` into the new folder `out_dir`
    (its YAML and `data/`, a `datasets` folder); returns the YAML's path. Pass `out_dir` as lmms-eval's
    `--include_path`."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    if not _NAME.fullmatch(name):
        raise TaskError(f"name {name!r}: use letters, digits, '_', '-' and '.' (lmms-eval's --tasks splits on ',')")
    if max_new_tokens < 1:
        raise TaskError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise TaskError(f"{out}: the folder exists and is not empty; give a new folder")
    records, _ = read_llava_json(data)
    records = records[:limit] if limit else records
    if not records:
        raise TaskError(f"{data}: no records to write")
    docs = vqa_docs(records, image_root)
    features = Features(
        {
            "id": Value("string"),
            "images": Sequence(Image()),
            "question": Value("string"),
            "answers": Sequence(Value("string")),
            "qtype": Value("string"),
        }
    )
    columns = {k: [d[k] for d in docs] for k in features}
    out.mkdir(parents=True, exist_ok=True)
    DatasetDict({SPLIT: Dataset.from_dict(columns, features=features)}).save_to_disk(str(out / "data"))
    path = out / f"{name}.yaml"
    path.write_text(task_yaml(name, (out / "data").resolve(), max_new_tokens))
    return path


# -- called by lmms-eval through the YAML's `!function` tags --------------------------------------------------------


def doc_to_visual(doc: dict) -> list:
    return [im.convert("RGB") for im in doc["images"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    """The answer's VQA accuracy against the document's gold answers, as `mmbridge eval --task vqa` scores it."""
    return {METRIC: vqa_accuracy([results[0]], [doc["answers"]])["vqa_accuracy"]}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        prog="python -m mmbridge.interop.lmms.task",
        description="write a local lmms-eval VQA task (YAML + datasets folder) from a LLaVA-format JSON file",
    )
    p.add_argument("--data", required=True, help="LLaVA-format JSON: one question per record, images first")
    p.add_argument("--images", required=True, help="the folder the records' image names are relative to")
    p.add_argument("--out", required=True, help="a new folder: pass it to lmms-eval as --include_path")
    p.add_argument("--name", default=TASK, help=f"the task's name for lmms-eval's --tasks (default {TASK})")
    p.add_argument("--limit", type=int, default=None, help="the first N records only")
    p.add_argument("--max-new-tokens", type=int, default=24, help="as `mmbridge eval --max-new-tokens` (default 24)")
    args = p.parse_args(argv)
    path = write_task(args.out, args.data, args.images, args.name, args.limit, args.max_new_tokens)
    print(path)
    return path


if __name__ == "__main__":
    main()
