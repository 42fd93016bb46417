"""Training datasets: LLaVA records → tokenised samples with images, a seeded mixture sampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmbridge.data.images import ImageError, load_image, preprocess
from mmbridge.data.llava import DataError, printable, read_llava_json, record_images
from mmbridge.data.processor import IGNORE, Processor
from mmbridge.data.sampler import LengthGroupedBatches, MixtureSampler  # noqa: F401  (re-exported)

BRIDGE_TEXT = ("caption_ids", "instruction_ids")  # the bridge's own tokens, see Processor.bridge_text


class ConversationDataset(Dataset):
    """LLaVA-format records, tokenised up front (so text errors surface before training).

    Images are read lazily; with `skip_bad` an unreadable image drops the sample from its batch
    and is counted, otherwise it raises with the file and record named.
    """

    def __init__(self, json_path: str | Path, image_root: str | Path, processor: Processor, skip_bad: bool = False):
        self.json_path, self.image_root = Path(json_path), Path(image_root)
        self.processor, self.skip_bad = processor, skip_bad
        records, skipped = read_llava_json(self.json_path, skip_bad=skip_bad)
        self.skipped: Counter = Counter(skipped)
        self.truncated = 0
        self.samples: list[dict] = []
        for i, rec in enumerate(records):
            where = f"{self.json_path}: record {i} (id {printable(rec['id'])})"
            paths = record_images(rec)
            try:
                enc = processor.encode(rec["conversations"], len(paths), where)
            except DataError as e:
                if not skip_bad:
                    raise
                self.skipped[e.kind] += 1
                continue
            self.truncated += enc.truncated
            self.samples.append({"id": str(rec["id"]), "input_ids": enc.input_ids, "labels": enc.labels,
                                 **processor.bridge_text(rec["conversations"]),
                                 "images": [str(self.image_root / p) for p in paths], "where": where})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        s = self.samples[idx]
        try:
            images = [load_image(p) for p in s["images"]]
        except ImageError as e:
            if not self.skip_bad:
                raise DataError(f"{s['where']}: {e}", "unreadable image") from e
            return {"id": s["id"], "skip": "unreadable image"}
        pixels = preprocess(images, self.processor.image_size, self.processor.image_mean, self.processor.image_std) \
            if images else torch.zeros(0, 3, self.processor.image_size, self.processor.image_size)
        return {"id": s["id"], "input_ids": s["input_ids"], "labels": s["labels"], "pixel_values": pixels,
                **{k: s[k] for k in BRIDGE_TEXT if k in s}}


class Collator:
    """Right-pads a list of samples into a batch; samples marked `skip` are dropped and counted."""

    def __init__(self, processor: Processor):
        self.processor = processor

    def __call__(self, items: list[dict]) -> dict:
        skipped = Counter(it["skip"] for it in items if "skip" in it)
        items = [it for it in items if "skip" not in it]
        if not items:
            return {"skipped": skipped, "empty": True}
        input_ids = self.processor.pad([it["input_ids"] for it in items], self.processor.pad_id)
        labels = self.processor.pad([it["labels"] for it in items], IGNORE)
        lengths = torch.tensor([len(it["input_ids"]) for it in items])
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        return {
            "ids": [it["id"] for it in items],
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),
            "skipped": skipped,
            **self._bridge_text(items),
        }

    def _bridge_text(self, items: list[dict]) -> dict:
        """caption_ids [B, L] per sample; instruction_ids [n_images, L] per image (None without images)."""
        out = {}
        if "caption_ids" in items[0]:
            out["caption_ids"] = self.processor.pad_text([it["caption_ids"] for it in items])
        if "instruction_ids" in items[0]:
            out["instruction_ids"] = self.processor.pad_text([s for it in items for s in it["instruction_ids"]])
        return out
