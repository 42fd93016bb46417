"""Interleaved documents as LM inputs: raw text (no chat template), each image as the bridge's tokens.

A document is an MMC4-style record (`text_list`, `image_info`), parsed by `lcl.readers.parse_document`
and laid out by LCL's rules (`lcl.sequence.layout`): images matched below `min_sim` are dropped, at most
one image per sentence (the best matched) and `max_images` in all, each placed before or after its
sentence (`image_position`; `random` draws once per document from (seed, record), so a document's
layout and length are fixed and can be indexed). Sentences are joined by single spaces, an image
becomes `num_image_tokens` image-token ids (the expansion conversations get), and the tokenizer's EOS
closes the document. Labels: every text token and the EOS; no image token.

Too long for `max_length`: the trailing text is cut when every image still fits whole (counted as
shortened), else a DataError names the record (an error, or a counted skip with `bad_samples: skip`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmbridge.data.llava import DataError
from mmbridge.data.processor import IGNORE
from mmbridge.lcl.readers import parse_document
from mmbridge.lcl.sequence import SequenceConfig, layout
from mmbridge.models.language import IMAGE_TOKEN
from mmbridge.data.layouts import require_fixed

LAYOUT_KEYS = ("max_images", "min_sim", "image_position")  # what a recipe's `sequence` may set for LMM stages


@dataclass
class EncodedDocument:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    images: list[str] = field(default_factory=list)  # image names, in the order of their tokens
    before: list[str] = field(default_factory=list)  # per image: the text that precedes it (the Q-Former's instruction)
    text: str = ""  # the document's text, sentences joined


class DocumentEncoder:
    """Lays out and tokenises documents for one processor (its tokenizer, image tokens and `max_length`)."""

    def __init__(self, processor, sequence: dict | None = None, seed: int = 0):
        self.processor, self.seed = processor, seed
        require_fixed(processor, "interleaved documents")
        unknown = set(sequence or {}) - set(LAYOUT_KEYS)
        if unknown:
            raise ValueError(f"sequence: unknown key(s) {sorted(unknown)} for interleaved sources; "
                             f"expected some of {list(LAYOUT_KEYS)}")
        self.cfg = SequenceConfig(**(sequence or {}), max_length=processor.max_length)
        self._marks = [IMAGE_TOKEN, *processor._special]  # text holding one of these would fake the structure

    @property
    def settings(self) -> dict:
        """Everything besides the processor that a document's tokens depend on (for the index's cache key)."""
        c = self.cfg
        return {"max_images": c.max_images, "min_sim": c.min_sim, "image_position": c.image_position,
                "seed": self.seed, "eos": self.processor.tokenizer.eos_token_id}

    def pieces(self, record: object, where: str, row: int) -> list[tuple[str, object]]:
        """The record's ("text", sentence) and ("image", ImageRef) pieces in reading order; image sources
        are the names in `image_info` (the store reads them)."""
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object, got {type(record).__name__}", "not an object")
        try:
            doc = parse_document(record, where)  # names only: the store reads them (`image_ref`)
        except DataError as e:
            raise DataError(str(e), "bad document") from e
        for k, text in enumerate(doc.texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{where}: text_list[{k}] is not valid UTF-8 text", "bad UTF-8") from None
            mark = next((m for m in self._marks if m in text), None)
            if mark is not None:
                raise DataError(f"{where}: text_list[{k}] contains the special token {mark!r}, which would fake "
                                "an image or the text's structure", "special token in text")
        return layout(doc, self.cfg, np.random.default_rng([self.seed, 20, row]))

    def encode_many(self, items: list[tuple[list, str]]) -> list[EncodedDocument | DataError]:
        """(pieces, where) → the encoding, or the DataError that makes the document unusable; one tokenizer call."""
        texts, at = [], []
        for pieces, _ in items:
            at.append(len(texts))
            first = True
            for kind, item in pieces:
                if kind == "text":
                    texts.append(item if first else " " + item)
                    first = False
        tok = self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [self._finish(pieces, where, tok, a) for (pieces, where), a in zip(items, at)]

    def _finish(self, pieces: list, where: str, tok: list[list[int]], t: int) -> EncodedDocument | DataError:
        proc = self.processor
        n_tok, img_id = proc.num_image_tokens, proc.image_token_id
        parts, images, before, texts = [], [], [], []
        for kind, item in pieces:
            if kind == "image":
                parts.append(np.full(n_tok, img_id, dtype=np.int64))
                images.append(str(item.source))
                before.append(texts[-1] if texts else "")
            else:
                parts.append(np.asarray(tok[t], dtype=np.int64))
                texts.append(item)
                t += 1
        eos = proc.tokenizer.eos_token_id
        if eos is not None:
            parts.append(np.asarray([eos], dtype=np.int64))
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        is_image = np.zeros(len(ids), dtype=bool)
        at = 0
        for p, (kind, _) in zip(parts, pieces):
            is_image[at:at + len(p)] = kind == "image"
            at += len(p)
        if (ids[~is_image] == img_id).any():
            return DataError(f"{where}: the text tokenises to the image token", "special token in text")
        labels = np.where(is_image, IGNORE, ids)
        truncated = False
        if len(ids) > proc.max_length:
            img_pos = np.flatnonzero(is_image)
            if len(img_pos) and img_pos[-1] >= proc.max_length:
                return proc._image_past_budget(where, len(ids), int(img_pos[-1]) + 1)
            ids, labels, truncated = ids[:proc.max_length], labels[:proc.max_length], True
        if not (labels[1:] != IGNORE).any():
            return DataError(f"{where}: no text token to learn from" + (" within max_length" if truncated else ""),
                             "no text tokens")
        return EncodedDocument(ids.tolist(), labels.tolist(), truncated, images, before, " ".join(texts))
