"""Interleaved data for LCL: the built-in world's documents, MMC4-style JSONL, webdataset shards.

MMC4 style: one JSON object per document with `text_list` (sentences) and `image_info`, a list of
`{image_name, matched_text_index, matched_sim}`; image names are relative to an image root.
Shards (for scale): tar files whose samples hold `json` (such a document) and one member per image,
named in `image_name` (e.g. `0.png`); `write_shards` converts a JSONL + image root into shards.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

from mmbridge.data.images import ImageError
from mmbridge.data.llava import DataError
from mmbridge.data.media import media_path, read_media
from mmbridge.lcl.sequence import Document, ImageRef


class LCLDataError(DataError):
    """Interleaved data that cannot be read as written; the message names the file and line."""


def parse_document(obj: dict, where: str, image_root: str | None = None, members: dict | None = None) -> Document:
    """An MMC4-style dict → Document: images as files under `image_root` (checked: `data/media.py`), as decoded
    shard `members`, or, with neither, as the names `image_info` gives."""
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
        elif image_root is not None:
            try:
                source = media_path(image_root, str(name))
            except ImageError as e:
                raise LCLDataError(
                    f"{where}: image_info[{j}].image_name: {e}", getattr(e, "kind", "unreadable image")
                ) from e
        else:
            source = str(name)
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
    return [
        Document([d.texts[im.text_index]], [ImageRef(im.source, 0, im.sim)], f"{d.id}/{k}")
        for d in docs
        for k, im in enumerate(d.images)
        if 0 <= im.text_index < len(d.texts)
    ]


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
    """Convert an MMC4-style JSONL + image root into tar shards; returns the shard paths. Every image must be a
    regular file under `image_root` (`data/media.py`): checked for all documents before anything is written."""
    import webdataset as wds

    lines = [(n, line) for n, line in enumerate(Path(jsonl).read_text().splitlines()) if line.strip()]
    for n, line in lines:  # every image checked (a regular file under the root) before anything is packed
        parse_document(json.loads(line), f"{jsonl}:{n + 1}", str(image_root))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / "shard-%05d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for n, line in lines:
            obj = json.loads(line)
            sample = {"__key__": f"doc{n:07d}"}
            for j, info in enumerate(obj.get("image_info", [])):
                ext = Path(info["image_name"]).suffix.lstrip(".").lower() or "png"
                member = f"{j}.{ext}"
                try:
                    sample[member] = read_media(image_root, info["image_name"])
                except ImageError as e:
                    raise LCLDataError(
                        f"{jsonl}:{n + 1}: image_info[{j}].image_name: {e}", getattr(e, "kind", "unreadable image")
                    ) from e
                info["image_name"] = member
            sample["json"] = json.dumps(obj).encode()
            sink.write(sample)
    return sorted(str(p) for p in out_dir.glob("shard-*.tar"))
