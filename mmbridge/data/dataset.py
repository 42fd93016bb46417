"""Training datasets: LLaVA records → tokenised samples with images, tokenised when a sample is read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmbridge.data.images import ImageError
from mmbridge.data.layouts import batch_index
from mmbridge.data.llava import DataError, record_images
from mmbridge.data.processor import IGNORE, Processor
from mmbridge.data.record_index import image_counts, load_index
from mmbridge.data.sampler import LengthGroupedBatches, MixtureSampler  # noqa: F401  (re-exported)
from mmbridge.data.video import record_units, sampling_of
from mmbridge.data.video_records import VideoRecords
from mmbridge.data.views import pad_to

BRIDGE_TEXT = ("caption_ids", "instruction_ids")  # the bridge's own tokens, see Processor.bridge_text


def open_source(path: str | Path, image_root: str | Path = "", lines: bool | None = None):
    """The records of a LLaVA JSON list, a JSONL file (`lines`; default: a `.jsonl` name), or webdataset
    shards (a folder, a `.tar` or a glob)."""
    from mmbridge.data.record_file import RecordFile
    from mmbridge.data.shards import ShardRecords, is_shards

    return ShardRecords(path) if is_shards(path) else RecordFile(path, image_root, lines)


def adopt_index(dataset, index: dict, skip_bad: bool, where: str = "") -> None:
    """Give `dataset` its index's usable rows, lengths, image counts and tallies; the first bad record is raised
    (prefixed by `where`) unless bad records are skipped."""
    if index["first_error"] is not None and not skip_bad:
        kind, message = index["first_error"]
        raise DataError(f"{where}{message}", kind)
    dataset.skipped = Counter(index["skipped"])
    dataset.truncated = index["truncated"]
    dataset.rows, dataset.lengths, dataset.n_images = index["rows"], index["length"], index["images"]


class ConversationDataset(Dataset):
    """LLaVA-format records; a sample is parsed and tokenised when it is read (in the loader's workers).

    What every record gives (usable or why not, exact token length, image count) is indexed once and
    cached (`data/record_index.py`), so text errors still surface before training: the first bad
    record raises, naming the file and record, or with `skip_bad` bad records are counted. `records`: an
    opened source to read instead of `json_path` (e.g. `hf_source.HFRecords`). Images are
    read with their sample: an unreadable one raises naming file and record, or with `skip_bad` drops
    the sample from its batch and is counted there. Only numpy arrays are held per record. A record's
    `video` is read as its sampled frames (`data/video.py`, the processor's video settings); a sample
    with a video input of several frames carries `frame_counts`, the frames of each visual input. With
    `boxes_all_objects` (the source's option) every sample says so, for the `objects` objective.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path,
        processor: Processor,
        skip_bad: bool = False,
        workers: int | None = None,
        cache: bool = True,
        lines: bool | None = None,
        boxes_all_objects: bool = False,
        records=None,
    ):
        self.json_path, self.image_root = Path(json_path), Path(image_root)
        self.processor, self.skip_bad, self.boxes_all_objects = processor, skip_bad, boxes_all_objects
        records = records if records is not None else open_source(json_path, image_root, lines)
        self.store = VideoRecords(records, sampling_of(processor))
        adopt_index(
            self, load_index(self.store, processor, workers=workers, cache=cache), skip_bad, f"{self.store.name}: "
        )

    def __len__(self) -> int:
        return len(self.rows)

    def encoded(self, idx: int, counts: list[int] | None = None) -> dict:
        """Sample `idx` tokenised, its images named but not read (`counts`: each image's tokens; under a tiling
        whose counts vary, read from the images' sizes when not given)."""
        i = int(self.rows[idx])
        rec = self.store.load(i)
        where, names = self.store.place(i, rec), record_images(rec)
        if counts is None and self.processor.tiling.varies and names:
            counts = image_counts(self.store, self.processor, i, record_units(rec), where)
        enc = self.processor.encode(rec["conversations"], len(names), where, counts)
        if len(enc.input_ids) != self.lengths[idx]:
            raise DataError(
                f"{where}: {len(enc.input_ids)} tokens, but the index says {self.lengths[idx]}; "
                f"delete {self.store.name}'s entry in the data-index cache"
            )
        return {
            "id": str(rec.get("id", self.store.default_id(i))),
            "input_ids": enc.input_ids,
            "labels": enc.labels,
            **self.processor.bridge_text(rec["conversations"]),
            "images": self._image_refs(i, names, where),
            "names": names,
            "where": where,
            "row": i,
            "units": record_units(rec),
        }

    def _image_refs(self, i: int, names: list[str], where: str) -> list[str]:
        """Where each image of record `i` is; a name that is no regular file is a DataError naming the record."""
        try:
            return [self.store.image_ref(i, p) for p in names]
        except ImageError as e:
            raise DataError(f"{where}: {e}", getattr(e, "kind", "unreadable image")) from e

    @property
    def samples(self) -> Sequence[dict]:
        """Every sample as `encoded` gives it, tokenised on access."""
        return _Samples(self)

    def __getitem__(self, idx: int) -> dict:
        i = int(self.rows[idx])
        rec = self.store.load(i)
        units = record_units(rec)
        try:
            images = self.store.frames(i, units)
        except ImageError as e:
            kind = getattr(e, "kind", "unreadable image")  # a MediaPathError: a name outside the image root
            if not self.skip_bad:
                raise DataError(f"{self.store.place(i, rec)}: {e}", kind) from e
            return {"id": str(rec.get("id", self.store.default_id(i))), "skip": kind}
        views = self.processor.images(images)
        s = self.encoded(idx, views.get("counts"))
        frames = [len(u) for u in units]
        return {
            "id": s["id"],
            "input_ids": s["input_ids"],
            "labels": s["labels"],
            "pixel_values": views["pixel_values"],
            **({"frame_counts": frames} if len(frames) != len(images) else {}),
            **(
                {"visual_index": views["visual_index"], "views": views["views"], "image_counts": views["visual_counts"]}
                if "views" in views
                else {}
            ),
            **({"view_sizes": views["view_sizes"]} if "view_sizes" in views else {}),
            **({"boxes_all_objects": True} if self.boxes_all_objects else {}),
            **{k: s[k] for k in BRIDGE_TEXT if k in s},
        }


class _Samples(Sequence):
    def __init__(self, dataset: ConversationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx):
        n = len(self)
        if isinstance(idx, slice):
            return [self.dataset.encoded(i) for i in range(*idx.indices(n))]
        if not -n <= idx < n:
            raise IndexError(idx)
        return self.dataset.encoded(int(idx) % n)


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
            "pixel_values": self._pixels(items),
            "skipped": skipped,
            **self._bridge_text(items),
            **self._frame_counts(items),
            **self._visual_index(items),
            **self._boxes_all_objects(items),
        }

    @staticmethod
    def _boxes_all_objects(items: list[dict]) -> dict:
        """`boxes_all_objects` [B] (bool): whether each sample's boxes box every object of its image (its
        source's option); absent when no sample's source says so."""
        if not any("boxes_all_objects" in it for it in items):
            return {}
        return {"boxes_all_objects": torch.tensor([it.get("boxes_all_objects", False) for it in items])}

    @staticmethod
    def _pixels(items: list[dict]) -> torch.Tensor:
        """The samples' pixels in order; views of their own sizes (UHD) zero-padded to the largest."""
        if any("view_sizes" in it for it in items):
            return pad_to([it["pixel_values"] for it in items])
        return torch.cat([it["pixel_values"] for it in items])

    def _visual_index(self, items: list[dict]) -> dict:
        """Under a tiling whose counts vary: `visual_index` [image tokens], where each image token's vector comes
        from among the batch's bridge outputs (data/layouts.py), and `image_counts` [n_images], each image's
        tokens; images in the samples' order."""
        if not any("visual_index" in it for it in items):
            return {}
        return {
            "visual_index": batch_index(
                [it["visual_index"].numpy() for it in items],
                [it["views"] for it in items],
                self.processor.num_image_tokens,
            ),
            "image_counts": torch.tensor([c for it in items for c in it["image_counts"]], dtype=torch.long),
            **({"view_sizes": torch.cat([it["view_sizes"] for it in items])} if "view_sizes" in items[0] else {}),
        }

    @staticmethod
    def _frame_counts(items: list[dict]) -> dict:
        """`frame_counts` [n_inputs]: the frames of each visual input, when a sample has a multi-frame one."""
        if not any("frame_counts" in it for it in items):
            return {}
        return {
            "frame_counts": torch.tensor(
                [c for it in items for c in it.get("frame_counts", [1] * len(it["pixel_values"]))]
            )
        }

    def _bridge_text(self, items: list[dict]) -> dict:
        """caption_ids [B, L] per sample; instruction_ids [n_images, L] per image (None without images)."""
        out = {}
        if "caption_ids" in items[0]:
            out["caption_ids"] = self.processor.pad_text([it["caption_ids"] for it in items])
        if "instruction_ids" in items[0]:
            out["instruction_ids"] = self.processor.pad_text([s for it in items for s in it["instruction_ids"]])
        return out
