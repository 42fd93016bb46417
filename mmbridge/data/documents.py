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

`style: openflamingo` lays documents out by OpenFlamingo's MMC4 rules instead: each image before its sentence,
`end_of_chunk` (`<|endofchunk|>`, tokenised by the LM's tokenizer) before every image but the first and once
more at the end, then EOS; the tokenizer's BOS first; no space after an image; labels on the text from the
first image on, on each end-of-chunk, and on nothing from an end-of-chunk up to the next image (so not on the
closing EOS). A document without an image, and (Flamingo/MMC4) one with a single image with probability
`single_image_drop` (0.5; drawn once per (seed, record)), is left out and counted, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmbridge.core import IMAGE_TOKEN, RecipeError
from mmbridge.data.layouts import require_fixed
from mmbridge.data.llava import DataError
from mmbridge.data.processor import IGNORE
from mmbridge.lcl.readers import parse_document
from mmbridge.lcl.sequence import SequenceConfig, layout
from mmbridge.registry import SETTINGS

STYLE_KEYS = ("style", "end_of_chunk", "single_image_drop")
LAYOUT_KEYS = ("max_images", "min_sim", "image_position", *STYLE_KEYS)  # what `sequence` may set for LMM stages
STYLES = ("lcl", "openflamingo")


class Dropped(DataError):
    """A document the layout leaves out by rule (not a fault): counted, never raised as an error."""


def check_style(sequence: dict | None) -> dict:
    """The layout settings for LCL's `SequenceConfig`, after checking the style keys (ValueError)."""
    seq = dict(sequence or {})
    style = seq.pop("style", "lcl")
    if style not in STYLES:
        raise ValueError(f"sequence.style: expected one of {STYLES}, got {style!r}")
    eoc, drop = seq.pop("end_of_chunk", None), seq.pop("single_image_drop", None)
    if style != "openflamingo" and (eoc is not None or drop is not None):
        raise ValueError("sequence.end_of_chunk and single_image_drop belong to style: openflamingo")
    if eoc is not None and (not isinstance(eoc, str) or not eoc):
        raise ValueError(f"sequence.end_of_chunk: expected a non-empty string, got {eoc!r}")
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0 <= drop <= 1):
        raise ValueError(f"sequence.single_image_drop: expected a probability, got {drop!r}")
    if style == "openflamingo":
        if seq.get("image_position", "before") != "before":
            raise ValueError("sequence.image_position: style openflamingo puts each image before its sentence")
        seq["image_position"] = "before"
    return seq


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
            raise ValueError(
                f"sequence: unknown key(s) {sorted(unknown)} for interleaved sources; "
                f"expected some of {list(LAYOUT_KEYS)}"
            )
        self.cfg = SequenceConfig(**check_style(sequence), max_length=processor.max_length)
        self.style = (sequence or {}).get("style", "lcl")
        self._marks = [IMAGE_TOKEN, *processor._special]  # text holding one of these would fake the structure
        if self.style == "openflamingo":
            self.end_of_chunk = (sequence or {}).get("end_of_chunk", "<|endofchunk|>")
            self.single_image_drop = float((sequence or {}).get("single_image_drop", 0.5))
            self.eoc_ids = processor.tokenizer(self.end_of_chunk, add_special_tokens=False)["input_ids"]
            self._marks.append(self.end_of_chunk)

    @property
    def settings(self) -> dict:
        """Everything besides the processor that a document's tokens depend on (for the index's cache key)."""
        c = self.cfg
        out = {
            "max_images": c.max_images,
            "min_sim": c.min_sim,
            "image_position": c.image_position,
            "seed": self.seed,
            "eos": self.processor.tokenizer.eos_token_id,
        }
        if self.style == "openflamingo":
            out |= {
                "style": self.style,
                "eoc": self.eoc_ids,
                "drop": self.single_image_drop,
                "bos": self.processor.tokenizer.bos_token_id,
            }
        return out

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
                raise DataError(
                    f"{where}: text_list[{k}] contains the special token {mark!r}, which would fake "
                    "an image or the text's structure",
                    "special token in text",
                )
        pieces = layout(doc, self.cfg, np.random.default_rng([self.seed, 20, row]))
        if self.style == "openflamingo":
            n = sum(kind == "image" for kind, _ in pieces)
            if n == 0:
                raise Dropped(f"{where}: no image left after filtering", "no image (openflamingo)")
            if n == 1 and np.random.default_rng([self.seed, 21, row]).random() < self.single_image_drop:
                raise Dropped(f"{where}: a single image, dropped", "single image dropped (openflamingo)")
        return pieces

    def encode_many(self, items: list[tuple[list, str]]) -> list[EncodedDocument | DataError]:
        """(pieces, where) → the encoding, or the DataError that makes the document unusable; one tokenizer call."""
        texts, at = [], []
        for pieces, _ in items:
            at.append(len(texts))
            previous, seen_text = None, False
            for kind, item in pieces:
                if kind == "text":  # a space between sentences; openflamingo: none right after an image
                    spaced = previous == "text" if self.style == "openflamingo" else seen_text
                    texts.append(" " + item if spaced else item)
                    seen_text = True
                previous = kind
        tok = self.processor.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [self._finish(pieces, where, tok, a) for (pieces, where), a in zip(items, at)]

    def _finish(self, pieces: list, where: str, tok: list[list[int]], t: int) -> EncodedDocument | DataError:
        proc = self.processor
        n_tok, img_id = proc.num_image_tokens, proc.image_token_id
        flamingo = self.style == "openflamingo"
        parts, kinds, images, before, texts = [], [], [], [], []  # kinds: image | text | eoc | off (no label)

        def add(ids, kind):
            parts.append(np.asarray(ids, dtype=np.int64))
            kinds.append(kind)

        if flamingo and proc.tokenizer.bos_token_id is not None:
            add([proc.tokenizer.bos_token_id], "off")
        for kind, item in pieces:
            if kind == "image":
                if flamingo and images:  # an end-of-chunk closes the previous image's chunk
                    add(self.eoc_ids, "eoc")
                add(np.full(n_tok, img_id), "image")
                images.append(str(item.source))
                before.append(texts[-1] if texts else "")
            else:  # openflamingo: no loss on the text before the first image
                add(tok[t], "off" if flamingo and not images else "text")
                texts.append(item)
                t += 1
        if flamingo:
            add(self.eoc_ids, "eoc")
        eos = proc.tokenizer.eos_token_id
        if eos is not None:  # openflamingo: after an end-of-chunk with no image to follow, no loss
            add([eos], "off" if flamingo else "text")
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        is_image, learn = np.zeros(len(ids), dtype=bool), np.zeros(len(ids), dtype=bool)
        at = 0
        for p, kind in zip(parts, kinds):
            is_image[at : at + len(p)] = kind == "image"
            learn[at : at + len(p)] = kind in ("text", "eoc")
            at += len(p)
        if (ids[~is_image] == img_id).any():
            return DataError(f"{where}: the text tokenises to the image token", "special token in text")
        labels = np.where(learn, ids, IGNORE)
        truncated = False
        if len(ids) > proc.max_length:
            img_pos = np.flatnonzero(is_image)
            if len(img_pos) and img_pos[-1] >= proc.max_length:
                return proc._image_past_budget(where, len(ids), int(img_pos[-1]) + 1)
            ids, labels, truncated = ids[: proc.max_length], labels[: proc.max_length], True
        if not (labels[1:] != IGNORE).any():
            return DataError(
                f"{where}: no text token to learn from" + (" within max_length" if truncated else ""), "no text tokens"
            )
        return EncodedDocument(ids.tolist(), labels.tolist(), truncated, images, before, " ".join(texts))


@SETTINGS.register("sequence.interleaved")
def check_interleaved_settings(seq, where: str) -> None:
    """Kind lmm's `sequence`: how the interleaved sources' documents are laid out (LCL's rules, or a style's)."""
    if not isinstance(seq, dict) or set(seq) - set(LAYOUT_KEYS):
        raise RecipeError(f"{where}: for interleaved sources, expected some of {list(LAYOUT_KEYS)}, got {seq!r}")
    try:
        SequenceConfig(**check_style(seq))
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from e
