"""Generate answers for held-out LLaVA-format records and score them per task."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmbridge.data.images import load_image
from mmbridge.data.llava import read_llava_json, record_images
from mmbridge.data.media import media_path
from mmbridge.data.video import expand, load_frames, record_units, sampling_of
from mmbridge.eval.metrics import caption_scores, grounding_scores, vqa_accuracy
from mmbridge.eval.records import gold, prompt_turns  # noqa: F401  (also imported from here)

TASKS = ("caption", "vqa", "grounding", "choice")


@torch.no_grad()
def generate_answers(
    model,
    processor,
    records: list[dict],
    image_root: str | Path,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers for each record's final question (KV-cached, left-padded batches); a record's video is
    read as its sampled frames (`data/video.py`). Records of a batch that show the same images share one
    reading of them and of the text before their questions (`shared_prefixes`)."""
    model.eval()
    answers: list[str] = []
    root, sampling = Path(image_root), sampling_of(processor)
    # an InstructBLIP Q-Former or a deep-fusion bridge reads the image with the question: nothing to share
    share = not processor.instructions and not model.deep_fusion
    for i in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        batch = [
            expand(r, sampling, f"record {r.get('id')}", partial(media_path, root)) for r in records[i : i + batch_size]
        ]
        out = _answer_batch(model, processor, batch, root, max_new_tokens, share)
        if out is None:  # some question comes before its image: every record reads its own
            out = _answer_batch(model, processor, batch, root, max_new_tokens, False)
        answers += out
    return answers


def _answer_batch(model, processor, batch: list[dict], root: Path, max_new_tokens: int, share: bool):
    """Answers for one batch of expanded records, or None where sharing was asked and a prefix cannot hold
    its images."""
    keys = [json.dumps(record_units(r)) if share else str(j) for j, r in enumerate(batch)]
    first: dict[str, int] = {}
    group = [first.setdefault(k, len(first)) for k in keys]
    shown = [batch[keys.index(k)] for k in first]  # one record per distinct visual input
    units = [u for r in shown for u in record_units(r)]
    locate = partial(media_path, root)  # a regular file under the image root
    frames = load_frames(units, lambda name: load_image(locate(name)), locate)
    views = processor.images(frames)  # under a tiling: each image's views and own token count
    counts, at, own = views.get("counts"), 0, []
    for r in shown:  # each record's images' own counts (none given: the bridge's tokens per view)
        n = len(record_units(r))
        own.append(counts[at : at + n] if counts else None)
        at += n
    prompts = [processor.encode_prompt(prompt_turns(r), own[g]) for r, g in zip(batch, group)]
    extra = {"frame_counts": torch.tensor([len(u) for u in units])} if len(units) != len(frames) else {}
    extra.update({k: views[k] for k in ("visual_index", "view_sizes") if k in views})
    heads = prompts
    if len(shown) < len(batch):
        split = shared_prefixes(prompts, group, model.image_token_id)
        if split is None:
            return None
        heads, tails = split
        extra.update(
            suffix_ids=processor.pad(tails, processor.pad_id, left=True),
            suffix_mask=processor.left_mask(tails),
            group=torch.tensor(group),
        )
    if processor.instructions:  # InstructBLIP: the Q-Former reads each image's instruction
        extra["instruction_ids"] = processor.pad_text(
            [s for r in batch for s in processor.instruction_ids(prompt_turns(r))]
        )
    device = model.device
    extra = {k: v.to(device) for k, v in extra.items()}
    pixels = views["pixel_values"].to(device) if frames else None
    ids = processor.pad(heads, processor.pad_id, left=True)
    out = model.generate(
        ids.to(device),
        processor.left_mask(heads).to(device),
        pixels,
        max_new_tokens=max_new_tokens,
        eos_token_ids=processor.stop_token_ids,
        **extra,
    )
    return [processor.tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]


def shared_prefixes(prompts: list[list[int]], group: list[int], image_token_id: int):
    """Each group's common prompt prefix (at least one token short of its shortest prompt) and each prompt's
    rest: ([prefix per group], [suffix per prompt]), or None where an image token falls in a suffix."""
    prefixes, suffixes = [], [None] * len(prompts)
    for g in range(max(group) + 1):
        rows = [j for j, k in enumerate(group) if k == g]
        members = [prompts[j] for j in rows]
        n, limit = 0, min(map(len, members)) - 1
        while n < limit and all(p[n] == members[0][n] for p in members):
            n += 1
        if any(image_token_id in p[n:] for p in members):
            return None
        prefixes.append(members[0][:n])
        for j in rows:
            suffixes[j] = prompts[j][n:]
    return prefixes, suffixes


def evaluate_records(
    model,
    processor,
    records: list[dict],
    image_root,
    task: str,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    progress: bool = True,
    source: list[dict] | None = None,
) -> tuple[dict, list[dict]]:
    """Score `task` on `records`; returns (metrics, per-record predictions). `choice` ranks candidate answers
    without generating (`eval/choice.py`; `source`: the records whose answers are the candidates)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {TASKS}")
    if task == "choice":
        from mmbridge.eval.choice import evaluate_choice

        return evaluate_choice(model, processor, records, image_root, source, batch_size, progress)
    golds = [gold(r, task) for r in records]
    preds = generate_answers(model, processor, records, image_root, max_new_tokens, batch_size, progress, desc=task)
    if task == "caption":
        ids = [str(r["id"]) for r in records]
        metrics = caption_scores(dict(zip(ids, preds)), dict(zip(ids, golds)))
    elif task == "vqa":
        metrics = vqa_accuracy(preds, golds)
    else:
        metrics = grounding_scores(preds, golds)
    rows = [
        {
            "id": str(r["id"]),
            "image": record_images(r),
            **({"video": r["video"]} if "video" in r else {}),
            "question": prompt_turns(r)[-1]["value"],
            "prediction": p,
            "gold": g,
        }
        for r, p, g in zip(records, preds, golds)
    ]
    return metrics, rows


def evaluate_file(model, processor, json_path, image_root, task: str, limit: int | None = None, **kw):
    source, _ = read_llava_json(json_path)  # all of it: the answer set a `choice` record ranks
    records = source[:limit] if limit else source
    return evaluate_records(model, processor, records, image_root, task, source=source, **kw)
