"""Answer ranking (`mmbridge eval --task choice`): no generation. Each candidate answer is scored by the
model's log-likelihood of its tokens after the record's question (teacher forcing; the end-of-turn token
the chat template closes a reply with counts, as in training), summed and per token, and the best-scoring
candidate is the model's choice, as multiple-choice benchmarks score LMs (e.g. MMBench, SEED-Bench).

A record's candidates: its `candidates` field; else the answers the source gives to questions of its type
(`qtype`, as the shapes world writes); else every answer in the source. The candidates of a batch are
scored together, each record's images encoded once for all its candidates.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmbridge.data.images import load_image, preprocess
from mmbridge.data.llava import record_images
from mmbridge.data.media import media_path
from mmbridge.data.processor import IGNORE
from mmbridge.eval.metrics import normalize_answer, vqa_accuracy, vqa_accuracy_by_type
from mmbridge.eval.records import gold, prompt_turns


def answers_of(record: dict) -> list[str]:
    """A record's gold answer(s): its `answer` field (a string or an annotators' list), else its last reply."""
    answer = record.get("answer", record["conversations"][-1]["value"])
    return [answer] if isinstance(answer, str) else list(answer)


def candidate_lists(records: list[dict], source: list[dict] | None = None) -> list[list[str]]:
    """Each record's candidates: its own list, else the distinct answers in `source` (default: `records`)
    to questions of its `qtype`, else all distinct answers in `source`; sorted, so the order is the source's
    content, not its record order."""
    source = records if source is None else source
    everything = sorted({a for r in source for a in answers_of(r)})
    by_type: dict[str, set[str]] = {}
    for r in source:
        if r.get("qtype") is not None:
            by_type.setdefault(r["qtype"], set()).update(answers_of(r))
    out = []
    for r in records:
        own = r.get("candidates")
        if own is not None:
            if not own or not all(isinstance(c, str) for c in own):
                raise ValueError(f"record {r.get('id')}: candidates must be a non-empty list of strings")
            out.append(list(dict.fromkeys(own)))
        else:
            out.append(sorted(by_type[r["qtype"]]) if r.get("qtype") in by_type else everything)
    return out


def _final_reply_labels(labels: list[int]) -> list[int]:
    """Labels of the last reply only (the last run of labelled tokens): earlier replies are context."""
    end = max(i for i, t in enumerate(labels) if t != IGNORE) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [IGNORE] * start + labels[start:end] + [IGNORE] * (len(labels) - end)


def _row_logprobs(model, ids, mask, labels, pixels, visual, instruction_ids):
    """Summed log-probability of each row's labelled tokens, and their count."""
    embeds, extra = model.prepare(ids, pixels, visual=visual, instruction_ids=instruction_ids)
    hidden = model.lm.get_decoder()(
        inputs_embeds=embeds, attention_mask=mask, use_cache=False, **extra
    ).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = model.lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[keep][:, None])[:, 0]
    sums = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    sums.index_add_(0, keep.nonzero()[:, 0], logp.double())
    return sums.tolist(), keep.sum(1).tolist()


@torch.no_grad()
def score_candidates(
    model,
    processor,
    records: list[dict],
    candidates: list[list[str]],
    image_root: str | Path,
    batch_size: int = 16,
    progress: bool = True,
) -> list[list[tuple[float, int]]]:
    """(summed log-probability, tokens) of every candidate of every record, `batch_size` candidates at a time."""
    model.eval()
    device = model.device
    video = next((r for r in records if "video" in r), None)
    if video is not None:
        raise ValueError(f"record {video.get('id')}: answer ranking does not read videos yet; use the vqa task")
    rows = [(i, c) for i, cands in enumerate(candidates) for c in cands]
    scores: list[tuple[float, int]] = []
    for start in tqdm(range(0, len(rows), batch_size), desc="choice", disable=not progress, dynamic_ncols=True):
        chunk = rows[start : start + batch_size]
        ids, labels = [], []
        views = _views(processor, records, [i for i, _ in chunk], image_root)  # a tiling: each image's own count
        for i, answer in chunk:
            turns = [*prompt_turns(records[i]), {"from": "gpt", "value": answer}]
            where = f"record {records[i].get('id')}"
            enc = processor.encode(
                turns, len(record_images(records[i])), where, views[i]["counts"] if i in views else None
            )
            if enc.truncated:  # the cut would fall in the answer being scored
                raise ValueError(f"{where}: its question and the candidate {answer!r} exceed model.max_length")
            ids.append(enc.input_ids)
            labels.append(_final_reply_labels(enc.labels))
        ids_t = processor.pad(ids, processor.pad_id).to(device)
        mask = processor.pad([[1] * len(x) for x in ids], 0).to(device)
        labels_t = processor.pad(labels, IGNORE).to(device)
        with model.autocast():
            pixels, visual, instr = (
                _tiled(model, views, [i for i, _ in chunk], device)
                if views
                else _images(model, processor, records, [i for i, _ in chunk], image_root, device)
            )
            sums, counts = _row_logprobs(model, ids_t, mask, labels_t, pixels, visual, instr)
        scores += list(zip(sums, counts))
    out, k = [], 0
    for cands in candidates:
        out.append(scores[k : k + len(cands)])
        k += len(cands)
    return out


def _views(processor, records, owners: list[int], image_root) -> dict:
    """Under a varying tiling: each record's image inputs (`Processor.images`), else nothing."""
    if not processor.tiling.varies:
        return {}
    out = {}
    for i in dict.fromkeys(owners):
        paths = [media_path(image_root, p) for p in record_images(records[i])]
        if paths:
            out[i] = processor.images([load_image(p) for p in paths])
    return out


def _tiled(model, views: dict, owners: list[int], device):
    """`_images` for images of their own counts: each record's placed visual tokens, encoded once and repeated
    for its candidates, as one flat [1, tokens, width] run."""
    placed = {
        i: model.place_visual(
            model.encode_images(
                v["pixel_values"].to(device), view_sizes=v["view_sizes"].to(device) if "view_sizes" in v else None
            ),
            v["visual_index"].to(device),
        )
        for i, v in views.items()
    }
    rows = [placed[i] for i in owners if i in placed]
    return None, (torch.cat(rows)[None] if rows else None), None


def _images(model, processor, records, owners: list[int], image_root, device):
    """The images of each row's record: encoded once per record and repeated for its candidates (a
    deep-fusion bridge reads pixels inside the LM: those are repeated instead). Returns (pixels, visual,
    instruction_ids) for `model.prepare`."""
    distinct = list(dict.fromkeys(owners))
    paths = {i: [media_path(image_root, p) for p in record_images(records[i])] for i in distinct}
    if not any(paths.values()):
        return None, None, None
    pixels = {
        i: preprocess(
            [load_image(p) for p in paths[i]], processor.image_size, processor.image_mean, processor.image_std
        ).to(device)
        for i in distinct
        if paths[i]
    }
    instr = {i: processor.instruction_ids(prompt_turns(records[i])) for i in pixels} if processor.instructions else None
    if model.deep_fusion:
        rows = [i for i in owners if i in pixels]
        extra = processor.pad_text([s for i in rows for s in instr[i]]).to(device) if instr else None
        return torch.cat([pixels[i] for i in rows]), None, extra
    order = list(pixels)
    extra = processor.pad_text([s for i in order for s in instr[i]]).to(device) if instr else None
    tokens = model.encode_images(torch.cat([pixels[i] for i in order]), extra)
    per_record = dict(zip(order, tokens.split([len(paths[i]) for i in order])))
    return None, torch.cat([per_record[i] for i in owners if i in per_record]), None


def evaluate_choice(
    model,
    processor,
    records: list[dict],
    image_root: str | Path,
    source: list[dict] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Accuracy of the best candidate by summed and by per-token log-likelihood (VQA normalisation; per
    `qtype` where records have one), and one row per record with every candidate's scores."""
    candidates = candidate_lists(records, source)
    scores = score_candidates(model, processor, records, candidates, image_root, batch_size, progress)
    golds = [gold(r, "vqa") for r in records]
    picks = {"sum": [], "mean": []}
    rows = []
    for r, cands, sc, g in zip(records, candidates, scores, golds):
        means = [s / max(n, 1) for s, n in sc]
        best_sum = max(range(len(cands)), key=lambda k: sc[k][0])  # the first of equal scores
        best_mean = max(range(len(cands)), key=lambda k: means[k])
        picks["sum"].append(cands[best_sum])
        picks["mean"].append(cands[best_mean])
        rows.append(
            {
                "id": str(r.get("id")),
                "image": record_images(r),
                "question": prompt_turns(r)[-1]["value"],
                "qtype": r.get("qtype"),
                "gold": g,
                "choice": cands[best_sum],
                "choice_per_token": cands[best_mean],
                "candidates": [
                    {"answer": c, "logprob": s, "tokens": n, "logprob_per_token": m}
                    for c, (s, n), m in zip(cands, sc, means)
                ],
            }
        )
    wanted = [{normalize_answer(a) for a in answers_of(r)} for r in records]
    metrics = {
        "choice_accuracy": vqa_accuracy(picks["sum"], golds)["vqa_accuracy"],
        "choice_accuracy_per_token": vqa_accuracy(picks["mean"], golds)["vqa_accuracy"],
        "n": len(records),
        "mean_candidates": sum(map(len, candidates)) / max(len(records), 1),
        "gold_not_a_candidate": sum(
            not w & {normalize_answer(c) for c in cands} for w, cands in zip(wanted, candidates)
        ),
    }
    qtypes = [r.get("qtype") for r in records]
    if any(t is not None for t in qtypes):
        metrics["by_qtype"] = vqa_accuracy_by_type(picks["sum"], golds, qtypes)
        metrics["by_qtype_per_token"] = vqa_accuracy_by_type(picks["mean"], golds, qtypes)
    return metrics, rows
