"""Records of a Hugging Face `datasets` dataset: a `save_to_disk` folder, or parquet / arrow files (a glob).

Each row becomes a LLaVA record when it is read, so indexing, packing, mixtures, resume and `bad_samples`
are the JSON sources' own (`dataset.ConversationDataset` takes this as its store). The dataset stays in
Arrow memory maps (parquet is converted once by `datasets` into its cache, then mapped): only the asked
row's cells are read, text and images apart.

A row's text is a LLaVA `conversations` column (`[{"from": "human", "value": "<image>\\n..."}, ...]`) or an
OpenAI-style `messages` column (`[{"role": "user", "content": [{"type": "image"}, {"type": "text",
"text": ...}]}, ...]`; `content` may be a plain string). In `messages`, each image part becomes `<image>`
and a turn's parts are joined with newlines. The images column holds, per row, one image or a list: bytes,
a path (relative to `image_root`), or an `Image` feature (`{"bytes", "path"}`); the k-th `<image>` is the
k-th image of the row. An `id` column, if there is one, gives each record's id (else the row number).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mmbridge.data.images import ImageError, decode_image, load_image
from mmbridge.data.llava import DataError, printable
from mmbridge.data.media import media_path

SPEAKERS = {"user": "human", "human": "human", "assistant": "gpt", "gpt": "gpt", "system": "system"}
INSTALL = "pip install datasets  (or: pip install 'mmbridge[data]')"


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hf_dataset sources need the `datasets` package, which is not installed: {INSTALL}") from e
    return datasets


def open_hf(path: str, split: str = ""):
    """The `datasets.Dataset` at `path` (memory-mapped) and the files whose bytes it is made of."""
    datasets = _datasets()
    folder = Path(path)
    if folder.is_dir() and any((folder / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        try:
            ds = datasets.load_from_disk(str(folder))
        except (OSError, ValueError, FileNotFoundError) as e:
            raise DataError(f"{path}: not a readable saved dataset ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            name = split or ("train" if "train" in ds else next(iter(ds), ""))
            if name not in ds:
                raise DataError(f"{path}: no split {name!r}; the dataset has {sorted(ds)}")
            ds = ds[name]
        elif split and ds.split is not None and str(ds.split) != split:
            raise DataError(f"{path}: holds split {str(ds.split)!r}, not {split!r}")
        if ds._indices is not None:  # a selection saved as indices into a table: laid out once, in the cache
            ds = ds.flatten_indices()
        files = [Path(f["filename"]) for f in ds.cache_files]
        return ds, files
    if split:
        raise DataError(
            f"{path}: `split` picks a split of a saved DatasetDict; parquet and arrow files are named "
            "by the path or glob alone"
        )
    pattern = str(folder / "*") if folder.is_dir() else str(path)
    files = sorted(Path(p) for p in glob.glob(pattern) if p.endswith((".parquet", ".arrow")))
    if not files:
        raise DataError(f"{path}: no saved dataset, .parquet or .arrow files found")
    kinds = {f.suffix for f in files}
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes .parquet and .arrow files; give one kind")
    try:
        if kinds == {".arrow"}:
            ds = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
        else:
            ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
            import pyarrow as pa

            pa.default_memory_pool().release_unused()  # the conversion's freed buffers (~150 MB at 665k rows)
    except Exception as e:  # noqa: BLE001  (pyarrow and datasets raise many kinds for a bad file)
        raise DataError(f"{path}: cannot read as a dataset ({type(e).__name__}: {e})") from e
    return ds, files


class HFRecords:
    """A `datasets` dataset as LLaVA records, each row read on demand (the store of a ConversationDataset)."""

    def __init__(
        self,
        path: str,
        conversations: str = "",
        messages: str = "",
        images: str = "",
        split: str = "",
        image_root: str | os.PathLike = "",
    ):
        if bool(conversations) == bool(messages):
            raise DataError(f"{path}: name exactly one text column, `conversations` or `messages`")
        self.name = f"{path}[{split}]" if split else str(path)
        ds, self.files = open_hf(path, split)
        self.text_col, self.layout = (conversations, "conversations") if conversations else (messages, "messages")
        self.image_col = images
        columns = list(ds.column_names)
        for field, col in (("conversations" if conversations else "messages", self.text_col), ("images", images)):
            if col and col not in columns:
                raise DataError(f"{self.name}: {field}: no column {col!r}; the dataset has {columns}")
        self.id_col = "id" if "id" in columns and "id" not in (self.text_col, images) else ""
        base = Path(path)
        self.image_root = Path(image_root) if image_root else (base if base.is_dir() else base.parent)
        self.table = ds.data  # Arrow, memory-mapped
        self.length = len(ds)
        settings = [self.layout, self.text_col, self.image_col, self.id_col, split, str(self.image_root)]
        self.kind = "hf-" + hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
        self._columns: dict = {}

    def __len__(self) -> int:
        return self.length

    def __getstate__(self):
        return {**self.__dict__, "_columns": {}}

    def located(self) -> dict:  # rows are addressed by number: nothing to cache
        return {}

    def restore(self, offsets: dict) -> None:
        pass

    def _scalar(self, col: str, i: int):
        """Row `i` of column `col` as an Arrow scalar (nothing else is read)."""
        if col not in self._columns:
            chunks = self.table.column(col).chunks
            self._columns[col] = (chunks, np.cumsum([0] + [len(c) for c in chunks]))
        chunks, starts = self._columns[col]
        k = int(np.searchsorted(starts, i, side="right")) - 1
        return chunks[k][i - int(starts[k])]

    def _cell(self, col: str, i: int):
        return self._scalar(col, i).as_py()

    def default_id(self, i: int) -> str:
        return str(i)

    def _id(self, i: int) -> str:
        rid = self._cell(self.id_col, i) if self.id_col else None
        return str(i) if rid is None else str(rid)

    def place(self, i: int, record: object = None) -> str:
        rid = record.get("id", i) if isinstance(record, dict) else self._id(i)
        return f"{self.name}: row {i} (id {printable(rid)})"

    def _images(self, i: int) -> list:
        value = self._cell(self.image_col, i) if self.image_col else None
        return [] if value is None else list(value) if isinstance(value, list) else [value]

    def load(self, i: int) -> dict:
        return self.load_plain(i)[0]

    def load_plain(self, i: int) -> tuple[dict, bool]:
        """Row `i` as a LLaVA record (`image`: the row's image positions as names)."""
        where = f"{self.name}: row {i} (id {printable(self._id(i))})"
        convert = _from_conversations if self.layout == "conversations" else _from_messages
        turns = convert(self._cell(self.text_col, i), f"{where}: {self.text_col}")
        rec = {"id": self._id(i), "conversations": turns}
        n = self._count_images(i)
        if n:
            rec["image"] = [str(j) for j in range(n)]
        return rec, True  # Arrow strings are valid UTF-8

    def _count_images(self, i: int) -> int:
        """How many images row `i` has, without reading them."""
        cell = self._scalar(self.image_col, i) if self.image_col else None
        if cell is None or not cell.is_valid:
            return 0
        import pyarrow as pa

        listed = (
            pa.types.is_list(cell.type) or pa.types.is_large_list(cell.type) or pa.types.is_fixed_size_list(cell.type)
        )
        return len(cell) if listed else 1

    def image_ref(self, i: int, name: str) -> str:
        """The image's field, for messages (which name the source and row before it)."""
        return f"{self.image_col}[{name}]"

    def image(self, i: int, name: str):
        """Image `name` (its position) of row `i`, decoded from its bytes or read from its path."""
        ref, items = self.image_ref(i, name), self._images(i)
        j = int(name)
        if not 0 <= j < len(items):
            raise ImageError(ref, f"the row has {len(items)} image(s)")
        item = items[j]
        if isinstance(item, dict):  # an Image feature: bytes, else a path
            item = item.get("bytes") or item.get("path")
        if isinstance(item, (bytes, bytearray)):
            return decode_image(bytes(item), ref)
        if isinstance(item, str) and item:
            try:
                return load_image(media_path(self.image_root, item))
            except ImageError as e:  # the same kind (a path outside the root is counted apart)
                raise type(e)(ref, f"{e.path}: {e.reason}") from e
        raise ImageError(ref, f"expected image bytes, a path or an Image feature, got {type(item).__name__}")


def _turn_error(where: str, message: str) -> DataError:
    return DataError(f"{where}: {message}", "bad turn")


def _from_conversations(value, where: str) -> list[dict]:
    """A LLaVA `conversations` cell, checked for shape (check_record checks the rest)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of turns, got {type(value).__name__}", "no conversations")
    turns = []
    for j, t in enumerate(value):
        if not isinstance(t, dict) or t.get("from") not in SPEAKERS or not isinstance(t.get("value"), str):
            raise _turn_error(where, f"[{j}] must be {{'from': human|gpt|system, 'value': str}}, got {t!r:.80}")
        turns.append({"from": t["from"], "value": t["value"]})
    return turns


def _from_messages(value, where: str) -> list[dict]:
    """OpenAI-style messages → LLaVA turns: image parts become `<image>`, parts joined by newlines."""
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: expected a non-empty list of messages, got {type(value).__name__}", "no conversations"
        )
    turns = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in SPEAKERS:
            raise _turn_error(where, f"[{j}] must be {{'role': user|assistant|system, 'content': ...}}, got {m!r:.80}")
        content = m.get("content")
        if isinstance(content, str):
            texts = [content]
        elif isinstance(content, list) and content:
            texts = []
            for k, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    texts.append("<image>")
                elif kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    raise _turn_error(
                        where,
                        f"[{j}].content[{k}] must be {{'type': 'image'}} or "
                        f"{{'type': 'text', 'text': str}}, got {part!r:.80}",
                    )
        else:
            raise _turn_error(where, f"[{j}].content must be a string or a non-empty list of parts")
        turns.append({"from": SPEAKERS[m["role"]], "value": "\n".join(texts)})
    return turns
