"""Turns a conversation with images into LM inputs: chat template, image tokens, label mask."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmbridge.data.llava import ROLES, DataError
from mmbridge.models.language import IMAGE_TOKEN

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class Processor:
    """Owns tokenisation and image preprocessing for one composite model.

    Each `<image>` in a user turn becomes exactly `num_image_tokens` image-token ids, which the
    model fills with bridge outputs by position. Labels cover every assistant turn (its content
    and the end-of-turn token the template puts after it) and nothing else.
    """

    def __init__(self, tokenizer, num_image_tokens: int, image_size: int, image_mean, image_std,
                 max_length: int = 512, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_size, self.image_mean, self.image_std = image_size, tuple(image_mean), tuple(image_std)
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._special = sorted(set(tokenizer.all_special_tokens) - {IMAGE_TOKEN}, key=len, reverse=True)

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a reply: EOS and whatever special token the template closes a turn with."""
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        end = text.rfind("ok") + 2
        closing = next((s for s in self._special if text.startswith(s, end)), None)
        ids = {self.tokenizer.eos_token_id}
        if closing:
            ids.add(self.tokenizer.convert_tokens_to_ids(closing))
        return sorted(i for i in ids if i is not None)

    # -- text ---------------------------------------------------------------------------------
    def messages(self, conversations: list[dict]) -> list[dict]:
        """LLaVA turns → chat messages, with each `<image>` expanded to its token span."""
        span = IMAGE_TOKEN * self.num_image_tokens
        msgs = [{"role": ROLES[t["from"]], "content": t["value"].replace(IMAGE_TOKEN, span)} for t in conversations]
        if self.system_prompt is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def _target_spans(self, text: str, msgs: list[dict]) -> list[tuple[int, int]]:
        """Character spans of each assistant reply (plus the special token closing it)."""
        spans, cursor = [], 0
        for m in msgs:
            content = m["content"].strip()
            start = text.find(content, cursor)
            if start < 0:
                raise DataError(f"chat template dropped or rewrote a {m['role']} message: {content[:40]!r}")
            end = start + len(content)
            if m["role"] == "assistant":
                closing = next((s for s in self._special if text.startswith(s, end)), "")
                spans.append((start, end + len(closing)))
            cursor = end
        return spans

    def encode(self, conversations: list[dict], n_images: int, where: str = "sample") -> Encoded:
        """Tokenise a training conversation; the length budget counts image tokens."""
        msgs = self.messages(conversations)
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        spans = self._target_spans(text, msgs)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        # a BPE token may carry the space before a reply ("Ġred"): judge it by its first non-space char
        starts = offsets[:, 0] + np.array([len(text[a:b]) - len(text[a:b].lstrip()) for a, b in offsets], dtype=np.int64)
        is_target = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            is_target |= (starts >= s) & (offsets[:, 1] <= e) & (offsets[:, 1] > starts)
        n_img_tok = int((ids == self.image_token_id).sum())
        if n_img_tok != n_images * self.num_image_tokens:
            raise DataError(f"{where}: {n_img_tok} image tokens after tokenisation, expected "
                            f"{n_images} x {self.num_image_tokens}", "<image> count mismatch")
        labels = np.where(is_target, ids, IGNORE)
        truncated = False
        if len(ids) > self.max_length:
            ids, labels = self._shorten(ids, labels, where)
            truncated = True
        return Encoded(ids.tolist(), labels.tolist(), truncated)

    def _shorten(self, ids: np.ndarray, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Cut trailing text to fit `max_length`; never cut an image span apart or drop an image."""
        img_pos = np.flatnonzero(ids == self.image_token_id)
        if len(img_pos) and img_pos[-1] >= self.max_length:
            raise DataError(f"{where}: {len(ids)} tokens (images end at token {img_pos[-1] + 1}) exceed "
                            f"max_length={self.max_length}; the cut would fall inside or before an image",
                            "too long (image past the length budget)")
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not (labels[1:] != IGNORE).any():
            raise DataError(f"{where}: exceeds max_length={self.max_length} and no answer token fits",
                            "too long (no answer fits)")
        return ids, labels

    def encode_prompt(self, conversations: list[dict]) -> list[int]:
        """Tokenise the conversation so far plus the assistant header, for generation."""
        msgs = self.messages(conversations)
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- batching -----------------------------------------------------------------------------
    def pad(self, sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        out = torch.full((len(sequences), width), value, dtype=torch.long)
        for i, s in enumerate(sequences):
            if left:
                out[i, width - len(s):] = torch.as_tensor(s)
            else:
                out[i, : len(s)] = torch.as_tensor(s)
        return out

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id
