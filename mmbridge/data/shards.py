"""LLaVA records in webdataset shards: tar files whose samples hold a `json` record and its images.

A sample `KEY` is the members `KEY.json` (a LLaVA record whose `image` names members of the same
sample, e.g. `"0.png"`) and `KEY.0.png`, …. The tars are scanned once for member offsets; a record
and its images are then read by offset, so any sample is read on its own (random access, any order,
any process). `write_shards` converts a LLaVA JSON + image root into such shards.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from mmbridge.data.images import ImageError, decode_image
from mmbridge.data.llava import DataError, decode_json, printable, record_images
from mmbridge.data.media import media_path, read_media


def is_shards(path: str | os.PathLike) -> bool:
    """A folder of tars, a `.tar` file, or a glob of them."""
    text = str(path)
    return Path(text).is_dir() or text.endswith(".tar") or any(c in text for c in "*?[")


def _tars(path: str | os.PathLike) -> list[Path]:
    text = str(path)
    found = sorted(Path(text).glob("*.tar")) if Path(text).is_dir() else [Path(p) for p in sorted(glob.glob(text))]
    if not found:
        raise DataError(f"{path}: no .tar shards found")
    return found


def _split(member: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


class ShardRecords:
    """The samples of webdataset shards as records: byte offsets found once, each read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.name, self.files, self.kind = str(path), _tars(path), "shards"
        keys, where, offs, sizes, members = [], [], [], [], []
        for f, tar in enumerate(self.files):
            table: dict[str, dict[str, tuple[int, int]]] = {}
            order: list[str] = []
            try:
                with tarfile.open(tar, mode="r:") as t:
                    for m in t:
                        if not m.isfile():
                            continue
                        key, ext = _split(m.name)
                        if key not in table:
                            table[key] = {}
                            order.append(key)
                        table[key][ext] = (m.offset_data, m.size)
            except tarfile.TarError as e:
                raise DataError(f"{tar}: not a readable tar file ({e})") from e
            for key in order:
                found = table[key]
                keys.append(key)
                where.append(f)
                offs.append(found.get("json", (-1, 0))[0])
                sizes.append(found.get("json", (-1, 0))[1])
                members.append({k: v for k, v in found.items() if k != "json"})
        self.keys, self.file_of = np.array(keys), np.array(where, dtype=np.int32)
        self.offsets, self.sizes = np.array(offs, dtype=np.int64), np.array(sizes, dtype=np.int64)
        # image members, flat: sample i's are [first[i], first[i + 1])
        self.first = np.concatenate([[0], np.cumsum([len(m) for m in members])]).astype(np.int64)
        self.member_names = np.array([k for m in members for k in m] or [""])
        self.member_at = np.array([v for m in members for v in m.values()] or [(0, 0)], dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def located(self) -> dict:  # the tars are scanned when opened; nothing to cache
        return {}

    def restore(self, offsets: dict) -> None:
        pass

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def _read(self, f: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if f not in self._fds:
            self._fds[f] = os.open(self.files[f], os.O_RDONLY)
        return os.pread(self._fds[f], size, offset)

    def place(self, i: int, record: object = None) -> str:
        rid = printable(record.get("id", self.keys[i])) if isinstance(record, dict) else self.keys[i]
        return f"{self.files[self.file_of[i]]}: sample {self.keys[i]} (id {rid})"

    def load(self, i: int) -> object:
        return self.load_plain(i)[0]

    def load_plain(self, i: int) -> tuple[object, bool]:
        """`load(i)`, and whether the record holds no surrogate for sure (`llava.decode_json`)."""
        if self.offsets[i] < 0:
            raise DataError(f"{self.place(i)}: the sample has no json member", "no json member")
        text, plain = decode_json(self._read(int(self.file_of[i]), int(self.offsets[i]), int(self.sizes[i])))
        try:
            return json.loads(text), plain
        except json.JSONDecodeError as e:
            raise DataError(
                f"{self.place(i)}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}", "malformed JSON"
            ) from e

    def image_ref(self, i: int, name: str) -> str:
        return f"{self.files[self.file_of[i]]}:{self.keys[i]}.{name}"

    def image(self, i: int, name: str):
        a, b = self.first[i], self.first[i + 1]
        hits = np.flatnonzero(self.member_names[a:b] == name)
        if not len(hits):
            raise ImageError(self.image_ref(i, name), "not a member of the shard sample")
        offset, size = self.member_at[a + hits[0]]
        return decode_image(self._read(int(self.file_of[i]), int(offset), int(size)), self.image_ref(i, name))

    def default_id(self, i: int) -> str:
        return str(self.keys[i])


def write_shards(
    json_path: str | os.PathLike, image_root: str | os.PathLike, out_dir: str | os.PathLike, per_shard: int = 1000
) -> list[str]:
    """A LLaVA JSON list + image root → webdataset shards (`shard-00000.tar`, …); returns their paths.

    Shards are made to be shared, so every image must be a regular file under `image_root` (`media.py`);
    every name is checked before anything is written, and the first that is not raises a DataError naming
    the record and the image, with nothing packed."""
    import webdataset as wds

    from mmbridge.data.llava import read_llava_json

    records, _ = read_llava_json(json_path)
    for n, rec in enumerate(records):
        for j, p in enumerate(record_images(rec)):
            _checked(json_path, n, rec, j, lambda p=p: media_path(image_root, p))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out_dir / "shard-%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for n, rec in enumerate(records):
            sample = {"__key__": f"s{n:08d}"}
            names = []
            for j, p in enumerate(record_images(rec)):
                member = f"{j}.{Path(p).suffix.lstrip('.').lower() or 'png'}"
                sample[member] = _checked(json_path, n, rec, j, lambda p=p: read_media(image_root, p))
                names.append(member)
            if names:
                rec = {**rec, "image": names[0] if isinstance(rec.get("image"), str) else names}
            sample["json"] = json.dumps(rec).encode()
            sink.write(sample)
    return sorted(str(p) for p in out_dir.glob("shard-*.tar"))


def _checked(json_path, n: int, rec: dict, j: int, read):
    """`read()`, its ImageError as a DataError naming the record and its image."""
    try:
        return read()
    except ImageError as e:
        raise DataError(
            f"{json_path}: record {n} (id {printable(rec.get('id', n))}): image[{j}]: {e}",
            getattr(e, "kind", "unreadable image"),
        ) from e
