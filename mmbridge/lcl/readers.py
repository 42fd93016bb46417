"""Interleaved data for LCL: the built-in world's documents, MMC4-style JSONL, webdataset shards.

MMC4 style: one JSON object per document with `text_list` (sentences) and `image_info`, a list of
`{image_name, matched_text_index, matched_sim}`; image names are relative to an image root.
Shards (for scale): tar files whose samples hold `json` (such a document) and one member per image,
named in `image_name` (e.g. `0.png`); `write_shards` converts a JSONL + image root into shards.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterator

from mmbridge.data.llava import DataError
from mmbridge.lcl.sequence import Document, ImageRef


class LCLDataError(DataError):
    """Interleaved data that cannot be read as written; the message names the file and line."""


def parse_document(obj: dict, where: str, image_root: str | None = None, members: dict | None = None) -> Document:
    """An MMC4-style dict → Document (images as paths under `image_root`, or decoded shard members)."""
    if not isinstance(obj.get("text_list"), list):
        raise LCLDataError(f"{where}: expected a `text_list` list")
    images = []
    for j, info in enumerate(obj.get("image_info", [])):
        try:
            name, t, sim = info["image_name"], int(info["matched_text_index"]), float(info.get("matched_sim", 1.0))
        except (KeyError, TypeError, ValueError) as e:
            raise LCLDataError(f"{where}: image_info[{j}] needs image_name and matched_text_index ({e})") from e
        if members is not None:
            if name not in members:
                raise LCLDataError(f"{where}: image {name!r} is not in the shard sample")
            from PIL import Image

            source = Image.open(io.BytesIO(members[name]))
        else:
            source = os.path.join(image_root or "", name)
        images.append(ImageRef(source, t, sim))
    return Document([str(t) for t in obj["text_list"]], images, str(obj.get("id", where)))


def read_jsonl(path: str | Path, image_root: str | Path) -> list[Document]:
    """Every document of an MMC4-style JSONL file."""
    docs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LCLDataError(f"{path}:{n}: invalid JSON ({e})") from e
            docs.append(parse_document(obj, f"{path}:{n}", str(image_root)))
    return docs


def as_pairs(docs: list[Document]) -> list[Document]:
    """Each image with its matched sentence, as a one-sentence document (CLIP-style pairs)."""
    return [Document([d.texts[im.text_index]], [ImageRef(im.source, 0, im.sim)], f"{d.id}/{k}")
            for d in docs for k, im in enumerate(d.images) if 0 <= im.text_index < len(d.texts)]


def iter_shards(urls: list[str]) -> Iterator[Document]:
    """Documents from webdataset tar shards, in order (split and shuffle `urls` before calling)."""
    import webdataset as wds

    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if "json" not in sample:
            raise LCLDataError(f"{sample.get('__url__')}: sample {sample.get('__key__')!r} has no json member")
        obj = json.loads(sample["json"])
        members = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
        yield parse_document(obj, f"{sample.get('__url__')}:{sample['__key__']}", members=members)


def write_shards(jsonl: str | Path, image_root: str | Path, out_dir: str | Path, per_shard: int = 1000) -> list[str]:
    """Convert an MMC4-style JSONL + image root into tar shards; returns the shard paths."""
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / "shard-%05d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for n, line in enumerate(Path(jsonl).read_text().splitlines()):
            if not line.strip():
                continue
            obj = json.loads(line)
            sample = {"__key__": f"doc{n:07d}"}
            for j, info in enumerate(obj.get("image_info", [])):
                ext = Path(info["image_name"]).suffix.lstrip(".").lower() or "png"
                member = f"{j}.{ext}"
                sample[member] = (Path(image_root) / info["image_name"]).read_bytes()
                info["image_name"] = member
            sample["json"] = json.dumps(obj).encode()
            sink.write(sample)
    return sorted(str(p) for p in out_dir.glob("shard-*.tar"))
