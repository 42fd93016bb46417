"""Does an export answer as its run does? Greedy answers from stock transformers beside mmbridge's own.

The export is loaded with `AutoModelForImageTextToText` and `AutoProcessor` (no mmbridge code on its path): each
record's question goes through the export's own chat template and image processor, `generate` decodes greedily,
and its answer is compared, as text, with the one mmbridge's `generate_answers` gives for the same record.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmbridge.data.images import load_image
from mmbridge.eval.evaluate import generate_answers
from mmbridge.eval.records import prompt_turns


def load_stock(export_dir: str | Path):
    """The exported folder as transformers alone loads it: (model, processor)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(str(export_dir)).eval(), AutoProcessor.from_pretrained(
        str(export_dir)
    )


def stock_answers(
    export_dir: str | Path, records: list[dict], image_root: str | Path, max_new_tokens: int = 24, stock=None
) -> list[str]:
    """Greedy answers of the exported folder, through transformers alone (`stock`: it loaded already)."""
    model, processor = stock or load_stock(export_dir)
    answers = []
    for record in records:
        turns = prompt_turns(record)
        question = turns[-1]["value"]
        n = question.count("<image>")
        content = [{"type": "image"}] * n + [{"type": "text", "text": question.replace("<image>", "").strip()}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        names = record["image"] if isinstance(record["image"], list) else [record["image"]]
        images = [load_image(Path(image_root) / name) for name in names]
        inputs = processor(text=text, images=images, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(
            processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    return answers


def compare_with_run(
    model,
    processor,
    export_dir: str | Path,
    records: list[dict],
    image_root: str | Path,
    max_new_tokens: int = 24,
    stock=None,
) -> dict:
    """mmbridge's and the export's greedy answers side by side, and how many agree (`stock`: the export loaded by
    `load_stock`, to reuse it over several calls)."""
    ours = [a.strip() for a in generate_answers(model, processor, records, image_root, max_new_tokens=max_new_tokens)]
    theirs = stock_answers(export_dir, records, image_root, max_new_tokens, stock)
    rows = [
        {"question": prompt_turns(r)[-1]["value"].replace("<image>", "").strip(), "mmbridge": a, "transformers": b}
        for r, a, b in zip(records, ours, theirs)
    ]
    return {"agree": sum(a == b for a, b in zip(ours, theirs)), "n": len(records), "rows": rows}


def say_rows(result: dict, say=print) -> None:
    """Each question with both answers, `=` where they agree."""
    for row in result["rows"]:
        mark = "=" if row["mmbridge"] == row["transformers"] else "≠"
        say(f"  {row['question']!r}: mmbridge {row['mmbridge']!r} {mark} transformers {row['transformers']!r}")


def check_export(run_dir: str | Path, export_dir: str | Path, n: int, say=print) -> dict:
    """`mmbridge export --check N`: N single-question records of the run's first eval set (VQA if it has one),
    answered by the export through transformers and by the run through mmbridge; prints both."""
    from mmbridge.data.llava import read_llava_json
    from mmbridge.data.sources import resolve_source
    from mmbridge.runs import load_run, read_recipe

    recipe = read_recipe(Path(run_dir))
    if not recipe.eval:
        raise ValueError(f"{run_dir}: its recipe has no eval set to check the export on")
    name, ev = next(((k, e) for k, e in recipe.eval.items() if e.task == "vqa"), next(iter(recipe.eval.items())))
    src = resolve_source(recipe, ev.json)
    records = [r for r in read_llava_json(src.json)[0] if len(prompt_turns(r)) == 1][:n]
    model, processor = load_run(Path(run_dir))[:2]
    result = compare_with_run(model, processor, export_dir, records, src.images, ev.max_new_tokens)
    say_rows(result, say)
    say(
        f"export check ({name}): transformers' generate gave mmbridge's answer on {result['agree']} of "
        f"{result['n']} held-out questions"
    )
    return result
