"""Turns a conversation with images into LM inputs: chat template, image tokens, label mask."""

from __future__ import annotations

import re
from dataclasses import dataclass

import jinja2
import numpy as np
import torch

from mmbridge.core import IGNORE, IMAGE_TOKEN  # noqa: F401  (IGNORE: also imported from here)
from mmbridge.data import spans as img_spans
from mmbridge.data.layouts import Tiling
from mmbridge.data.llava import ROLES, DataError

# Private-use characters that stand in for each message's content in a trial rendering of the
# template, so every message's place in the real rendering is known exactly.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
# What counts as space before a reply: ASCII only. str.isspace also takes control characters such
# as \x1d that this tokenizer drops, and a token's offsets then point at the dropped character.
_SPACE = " \t\n\r\f\v"
_SPACE_CODES = np.array([ord(c) for c in _SPACE], dtype=np.uint32)
# LaVIN's modality prefix (`modality_prefix`; its engine.py and lavin/generator.py): "Image: " before the image's
# tokens, "Image: N/A" in a sample without one. Here "Image: " goes ahead of each run of image placeholders (a video's
# frames are one run), and "Image: N/A" plus a newline (LaVIN's sentencepiece join puts a space there) heads the first
# user turn
IMAGE_PREFIX, NO_IMAGE_PREFIX = "Image: ", "Image: N/A\n"
_IMAGE_RUN = re.compile(f"(?:{re.escape(IMAGE_TOKEN)})+")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class Processor:
    """Owns tokenisation and image preprocessing for one composite model.

    Each `<image>` in a user turn becomes its image's count of image-token ids (`image_counts`: with the
    default `tiling`, `num_image_tokens`, the bridge's tokens per view, for every image), which the model
    fills with bridge outputs by position. Labels cover every assistant turn (its content
    and the end-of-turn token the template puts after it) and nothing else.

    A bridge with its own text side (the Q-Former) gives `text_tokenizer`: each sample then also
    carries its caption in those tokens, and with `instructions` each image its instruction.

    `modality_prefix` (LaVIN): "Image: " goes before each image and "Image: N/A" heads the first user turn of a
    conversation without one, in training and in prompts for generation alike; it is user text, never labelled.
    """

    def __init__(
        self,
        tokenizer,
        num_image_tokens: int,
        image_size: int,
        image_mean,
        image_std,
        max_length: int = 512,
        system_prompt: str | None = None,
        text_tokenizer=None,
        instructions: bool = False,
        max_text_tokens: int = 64,
        modality_prefix: bool = False,
        tiling: Tiling | None = None,
        video=None,
    ):
        self.tokenizer = tokenizer
        self.modality_prefix = modality_prefix
        self.text_tokenizer, self.instructions, self.max_text_tokens = text_tokenizer, instructions, max_text_tokens
        self.num_image_tokens = num_image_tokens  # the bridge's tokens per encoder view
        self.tiling = tiling or Tiling()  # how an image becomes views and tokens (data/layouts.py)
        self.video = video  # how frames are taken from a video (data/video.py; None: its defaults)
        self.image_size, self.image_mean, self.image_std = image_size, tuple(image_mean), tuple(image_std)
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self._special = sorted(set(tokenizer.all_special_tokens) - {IMAGE_TOKEN}, key=len, reverse=True)
        self._expand = _isolated(tokenizer, self.image_token_id)
        self._skeletons: dict[tuple, str] = {}  # the template rendered with markers, per sequence of roles
        self._shapes: dict[tuple, tuple] = {}  # per sequence of roles: how `_fill` lays out a conversation
        self._verbatim: bool | None = None  # the template prints contents verbatim (data/chat_shape.py)
        self._counter = False  # a PieceCounter, built on first use (None where the tokenizer has none)

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

    # -- images (data/spans.py, data/views.py) -----------------------------------------------------
    def image_counts(self, sizes) -> list:
        """Each image's span from its (width, height): its LM token count, or (UHD) its ids."""
        return img_spans.image_counts(self, sizes)

    def uhd_span(self, size) -> np.ndarray:
        return img_spans.uhd_span(self, size)

    def images(self, images: list) -> dict:
        """PIL images (or video frames) → the model's image inputs."""
        from mmbridge.data.views import image_inputs

        return image_inputs(self, images)

    # -- text ---------------------------------------------------------------------------------
    def messages(
        self, conversations: list[dict], span: int | None = None, counts: list[int] | None = None
    ) -> list[dict]:
        """LLaVA turns → chat messages, with each `<image>` expanded to its token span (`counts`, else the
        bridge's tokens per view; or `span` tokens for every image)."""
        return [{"role": r, "content": c} for r, c in zip(*self._turns(conversations, span, counts))]

    def _turns(
        self, conversations: list[dict], span: int | None = None, counts: list[int] | None = None
    ) -> tuple[list[str], list[str]]:
        """The roles and contents of `messages`."""
        roles = [ROLES[t["from"]] for t in conversations]
        values = [t["value"] for t in conversations]
        if self.modality_prefix:
            values = _with_modality_prefix(roles, values)
        if span == 1:
            contents = values
        elif span is not None or not counts:
            span = IMAGE_TOKEN * (self.num_image_tokens if span is None else span)
            contents = [v.replace(IMAGE_TOKEN, span) for v in values]
        else:  # each image its own span, in order
            if not all(map(img_spans.is_count, counts)):
                raise ValueError("spans with separators (UHD) are laid out as ids, with one image token per <image>")
            n = sum(v.count(IMAGE_TOKEN) for v in values)
            reps = iter(img_spans.lengths(self.num_image_tokens, counts, n))
            contents = [re.sub(re.escape(IMAGE_TOKEN), lambda _: IMAGE_TOKEN * next(reps), v) for v in values]
        if self.system_prompt is not None and roles[0] != "system":
            roles.insert(0, "system")
            contents.insert(0, self.system_prompt)
        return roles, contents

    def _render(self, msgs: list[dict], where: str, **kw) -> str:
        try:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise DataError(
                f"{where}: the chat template rejects this conversation: {e}", "rejected by chat template"
            ) from e

    def _check_turns(self, roles: list[str], contents: list[str], where: str) -> None:
        joined = "\n".join(contents)  # no special token in it: none in any turn
        specials = self._special if any(t in joined for t in self._special) else ()
        for role, content in zip(roles, contents):
            token = next((t for t in specials if t in content), None) if specials else None
            if token is not None:
                raise DataError(
                    f"{where}: a {role} turn contains the special token {token!r}, which would fake the chat structure",
                    "special token in text",
                )
            if role == "assistant" and (not content or content.isspace()):
                raise DataError(
                    f"{where}: an assistant turn is empty, so there is nothing to learn from it", "empty answer"
                )

    def _target_spans(self, text: str, msgs: list[dict], where: str) -> list[tuple[int, int]]:
        """Character spans of each assistant reply (plus the special token closing it).

        The template is rendered once with a marker in place of each content; the literal text
        between markers must then appear around each real content (as written, or trimmed) in `text`.
        A search for the content itself could land in a system prompt or an earlier turn.
        """
        roles = tuple(m["role"] for m in msgs)  # the skeleton depends on the roles alone
        skeleton = self._skeletons.get(roles)
        if skeleton is None:
            skeleton = self._render([{**m, "content": _MARK.format(k)} for k, m in enumerate(msgs)], where)
            self._skeletons[roles] = skeleton
        pieces = _MARK_RE.split(skeleton)
        literals, order = pieces[0::2], [int(k) for k in pieces[1::2]]
        if sorted(order) != list(range(len(msgs))) or not text.startswith(literals[0]):
            raise DataError(
                f"{where}: the chat template drops, repeats or reorders messages", "rewritten by chat template"
            )
        spans, pos = [], len(literals[0])
        for k, after in zip(order, literals[1:]):
            content = msgs[k]["content"]
            placed = next(
                (
                    c
                    for c in (content, content.strip())
                    if text.startswith(c, pos) and text.startswith(after, pos + len(c))
                ),
                None,
            )
            if placed is None:
                raise DataError(
                    f"{where}: the chat template rewrote a {msgs[k]['role']} message: {content[:40]!r}",
                    "rewritten by chat template",
                )
            if msgs[k]["role"] == "assistant":
                lead = len(placed) - len(placed.lstrip(_SPACE))
                closing = next((t for t in self._special if after.startswith(t)), "")
                end = pos + len(placed) + len(closing) if closing else pos + len(placed.rstrip(_SPACE))
                spans.append((pos + lead, end))
            pos += len(placed) + len(after)
        return spans

    def encode(
        self, conversations: list[dict], n_images: int, where: str = "sample", counts: list[int] | None = None
    ) -> Encoded:
        """Tokenise a training conversation; the length budget counts image tokens (`counts` per image, see
        `image_counts`; default: the bridge's tokens per view each)."""
        out = self.encode_many([(conversations, n_images, where, counts)])[0]
        if isinstance(out, DataError):
            raise out
        return out

    def encode_many(self, items: list[tuple]) -> list[Encoded | DataError]:
        """`encode` for many (conversations, n_images, where[, counts]) at once, the tokenizer called once:
        each result is the encoding or the DataError that `encode` would raise."""
        out: list = [None] * len(items)
        todo = []
        for k, (conversations, _, where, *counts) in enumerate(items):
            try:
                todo.append((k, *self._prepare(conversations, where, *counts)))
            except DataError as e:
                out[k] = e
        if todo:
            enc = self.tokenizer([t[1] for t in todo], add_special_tokens=False, return_offsets_mapping=True)
            for (k, text, spans), ids, offsets in zip(todo, enc["input_ids"], enc["offset_mapping"]):
                _, n_images, where, *counts = items[k]
                try:
                    out[k] = self._finish(text, spans, ids, offsets, n_images, where, *counts)
                except DataError as e:
                    out[k] = e
        return out

    def _prepare(
        self, conversations: list[dict], where: str, counts: list[int] | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text (one image token per `<image>` when `_expand` allows) and its answer spans."""
        roles, contents = self._turns(conversations, span=1 if self._expand else None, counts=counts)
        self._check_turns(roles, contents, where)
        if self._verbatim is None:
            from mmbridge.data.chat_shape import content_printed_verbatim

            self._verbatim = content_printed_verbatim(self.tokenizer.chat_template)
        if self._verbatim:
            shape = self._shapes.get(key := tuple(roles))
            if shape is not None:
                return self._fill(shape, contents, where)
        msgs = [{"role": r, "content": c} for r, c in zip(roles, contents)]
        if not self._verbatim:
            return self._render_and_span(msgs, where)
        shape = self._shape(msgs, where)  # the first conversation of these roles is rendered too, to compare
        fast, slow = _outcome(self._fill, shape, contents, where), _outcome(self._render_and_span, msgs, where)
        if _same(fast, slow):
            self._shapes[key] = shape
        else:  # not what the template gives after all: render every conversation
            self._verbatim = False
        if isinstance(slow, DataError):
            raise slow
        return slow

    def _render_and_span(self, msgs: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        text = self._render(msgs, where)
        return text, self._target_spans(text, msgs, where)

    def _shape(self, msgs: list[dict], where: str) -> tuple:
        """For a template that prints contents verbatim (`data/chat_shape.py`): the literal text around
        the contents, their order and, for an assistant's, the special token that closes it ("" if none;
        None for other roles); or the error (kind, message after `where`) that these roles raise."""
        try:
            skeleton = self._render([{**m, "content": _MARK.format(k)} for k, m in enumerate(msgs)], where)
        except DataError as e:
            return "error", e.kind, str(e)[len(where) :]
        pieces = _MARK_RE.split(skeleton)
        literals, order = pieces[0::2], [int(k) for k in pieces[1::2]]
        if sorted(order) != list(range(len(msgs))):
            return "error", "rewritten by chat template", ": the chat template drops, repeats or reorders messages"
        closing = [
            next((t for t in self._special if after.startswith(t)), "") if msgs[k]["role"] == "assistant" else None
            for k, after in zip(order, literals[1:])
        ]
        return "ok", literals, order, closing

    def _fill(self, shape: tuple, contents: list[str], where: str) -> tuple[str, list[tuple[int, int]]]:
        """What `_render_and_span` gives, laid out from the conversation's shape: each content is put
        in as written, so `_target_spans` would find each where it is put."""
        if shape[0] == "error":
            raise DataError(f"{where}{shape[2]}", shape[1])
        _, literals, order, closing = shape
        parts, spans = [literals[0]], []
        pos = len(literals[0])
        for k, after, close in zip(order, literals[1:], closing):
            content = contents[k]
            if close is not None:
                lead = len(content) - len(content.lstrip(_SPACE))
                spans.append(
                    (pos + lead, pos + len(content) + len(close) if close else pos + len(content.rstrip(_SPACE)))
                )
            parts += (content, after)
            pos += len(content) + len(after)
        return "".join(parts), spans

    def _finish(
        self, text: str, spans, ids, offsets, n_images: int, where: str, counts: list[int] | None = None
    ) -> Encoded:
        """Labels from the answer spans, image spans expanded, checks, and the cut to `max_length`."""
        ids = np.asarray(ids, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        # a BPE token may carry the space before a reply ("Ġred"): judge it by its first non-space char
        chars = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        solid = ~np.isin(chars, _SPACE_CODES)
        n = len(chars)
        next_solid = np.append(np.minimum.accumulate(np.where(solid, np.arange(n), n)[::-1])[::-1], n)
        starts = np.minimum(next_solid[offsets[:, 0]], offsets[:, 1]) if len(ids) else offsets[:, 0]
        is_target = np.zeros(len(ids), dtype=bool)
        for s, e in spans:
            is_target |= (starts >= s) & (offsets[:, 1] <= e) & (offsets[:, 1] > starts)
        if self._expand:  # each image token stands for its whole span
            ids, is_target = img_spans.expand_ids(ids, self.image_token_id, self.num_image_tokens, counts, is_target)
        n_img_tok = int((ids == self.image_token_id).sum())
        visual = [c if img_spans.is_count(c) else int((c == self.image_token_id).sum()) for c in counts or ()]
        wanted = img_spans.lengths(self.num_image_tokens, visual or None, n_images)
        if n_img_tok != sum(wanted) or len(wanted) != n_images:  # a negative count too
            raise DataError(
                f"{where}: {n_img_tok} image tokens after tokenisation, expected "
                f"{img_spans.expected(n_images, wanted)}",
                "<image> count mismatch",
            )
        labels = np.where(is_target, ids, IGNORE)
        if not (labels[1:] != IGNORE).any():
            raise DataError(f"{where}: no token of any answer is labelled", "no answer tokens")
        truncated = False
        if len(ids) > self.max_length:
            ids, labels = self._shorten(ids, labels, where)
            truncated = True
        return Encoded(ids.tolist(), labels.tolist(), truncated)

    def _shorten(self, ids: np.ndarray, labels: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Cut trailing text to fit `max_length`; never cut an image span apart or drop an image."""
        img_pos = np.flatnonzero(ids == self.image_token_id)
        if len(img_pos) and img_pos[-1] >= self.max_length:
            raise self._image_past_budget(where, len(ids), int(img_pos[-1]) + 1)
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not (labels[1:] != IGNORE).any():
            raise DataError(
                f"{where}: exceeds max_length={self.max_length} and no answer token fits", "too long (no answer fits)"
            )
        return ids, labels

    def _image_past_budget(self, where: str, n: int, image_end: int) -> DataError:
        return DataError(
            f"{where}: {n} tokens (images end at token {image_end}) exceed max_length={self.max_length}; "
            "the cut would fall inside or before an image",
            "too long (image past the length budget)",
        )

    def measure_many(self, items: list[tuple]) -> list[tuple[int, bool] | DataError]:
        """(length, shortened?) of each (conversations, n_images, where[, counts]) as `encode` gives them, or its
        DataError.

        Counted with a `PieceCounter` (`data/token_count.py`) where the tokenizer allows; a conversation
        whose labels that count cannot settle (no answer closed by a special token, or one too long to
        tell where its first answer ends) is encoded."""
        if self._counter is False:
            from mmbridge.data.token_count import PieceCounter

            added = {t.content for t in self.tokenizer.added_tokens_decoder.values()}
            marks = [IMAGE_TOKEN, *self._special]  # each must be found as itself, never inside another
            fits = self._expand and set(marks) <= added and all(_apart(m, t) for m in marks for t in added - {m})
            self._counter = PieceCounter.build(self.tokenizer) if fits else None
        out: list = [None] * len(items)
        ready, exact = [], []
        for k, (conversations, _, where, *counts) in enumerate(items):
            try:
                ready.append((k, *self._prepare(conversations, where, *counts)))
            except DataError as e:
                out[k] = e
        if self._counter is None:
            exact, ready = [k for k, _, _ in ready], []
        special = tuple(self._special)
        counted = []  # (k, text, end of the last image, end of the first closed answer, each image's tokens)
        for k, text, spans in ready:
            _, n_images, where, *given = items[k]
            closed = [e for s, e in spans if s > 0 and text.endswith(special, s, e)]
            images = text.count(IMAGE_TOKEN)
            reps = img_spans.lengths(self.num_image_tokens, given[0] if given else None, images)
            if not closed or (images != n_images and given and not all(map(img_spans.is_count, given[0] or ()))):
                exact.append(k)  # no answer ends in a special token (always labelled), or a UHD mismatch: encode
            elif images != n_images:
                wanted = img_spans.lengths(self.num_image_tokens, given[0] if given else None, n_images)
                out[k] = DataError(
                    f"{where}: {sum(reps)} image tokens after tokenisation, expected "
                    f"{img_spans.expected(n_images, wanted)}",
                    "<image> count mismatch",
                )
            else:
                image_end = text.rfind(IMAGE_TOKEN) + len(IMAGE_TOKEN) if images else 0
                counted.append((k, text, image_end, closed[0], reps))
        # each text's count, and (for one that is too long) the counts of its prefixes that end with the last
        # image and with the first closed answer; an image placeholder is one token of the text
        budget = [self.max_length - (sum(c[4]) - len(c[4])) for c in counted]
        lengths, prefixes = (
            self._counter.count_with_prefixes([c[1] for c in counted], [c[2:4] for c in counted], budget)
            if counted
            else ([], [])
        )
        for (k, text, _, first, reps), count, prefix in zip(counted, lengths, prefixes):
            where = items[k][2]
            extra = sum(reps) - len(reps)
            if (n := count + extra) <= self.max_length:
                out[k] = (n, False)
                continue
            image_end, first_n = prefix
            image_end = image_end + extra if reps else 0
            before = text.count(IMAGE_TOKEN, 0, first)
            first_n += sum(reps[:before]) - before
            if image_end > self.max_length:
                out[k] = self._image_past_budget(where, n, image_end)
            elif first_n > self.max_length:
                exact.append(k)
            else:
                out[k] = (self.max_length, True)
        for k, enc in zip(exact, self.encode_many([items[k] for k in exact])):
            out[k] = enc if isinstance(enc, DataError) else (len(enc.input_ids), enc.truncated)
        return out

    def encode_prompt(self, conversations: list[dict], counts: list | None = None) -> list[int]:
        """Tokenise the conversation so far plus the assistant header, for generation (`counts`: each image's
        tokens, see `image_counts`, or its span's ids)."""
        if counts and not all(map(img_spans.is_count, counts)):  # UHD: expanded as ids
            msgs = self.messages(conversations, span=1)
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
            return img_spans.expand_ids(ids, self.image_token_id, self.num_image_tokens, counts)[0].tolist()
        msgs = self.messages(conversations, counts=counts)
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- the bridge's own text (Q-Former) ------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        return self.text_tokenizer(text, truncation=True, max_length=self.max_text_tokens)["input_ids"]

    def instruction_ids(self, conversations: list[dict]) -> list[list[int]]:
        """One sequence per image: the text of the user turn holding it, without `<image>` (InstructBLIP)."""
        return [
            self._text_ids(t["value"].replace(IMAGE_TOKEN, " ").strip())
            for t in conversations
            for _ in range(t["value"].count(IMAGE_TOKEN))
        ]

    def bridge_text(self, conversations: list[dict]) -> dict:
        """`caption_ids` (the first assistant reply, for BLIP-2's stage 1) and, if the bridge reads
        instructions, `instruction_ids`; nothing without a `text_tokenizer`."""
        if self.text_tokenizer is None:
            return {}
        reply = next((t["value"] for t in conversations if ROLES.get(t["from"]) == "assistant"), "")
        out = {"caption_ids": self._text_ids(reply)}
        if self.instructions:
            out["instruction_ids"] = self.instruction_ids(conversations)
        return out

    def pad_text(self, sequences: list[list[int]]) -> torch.Tensor | None:
        return self.pad(sequences, self.text_tokenizer.pad_token_id) if sequences else None

    # -- batching -----------------------------------------------------------------------------
    def pad(self, sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        out = torch.full((len(sequences), width), value, dtype=torch.long)
        for i, s in enumerate(sequences):
            if left:
                out[i, width - len(s) :] = torch.as_tensor(s)
            else:
                out[i, : len(s)] = torch.as_tensor(s)
        return out

    @staticmethod
    def left_mask(sequences: list[list[int]]) -> torch.Tensor:
        """The attention mask of `sequences` as `pad(..., left=True)` lays them out."""
        lengths = torch.tensor([len(s) for s in sequences])
        width = int(lengths.max())
        return (torch.arange(width)[None, :] >= width - lengths[:, None]).long()

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def _with_modality_prefix(roles: list[str], values: list[str]) -> list[str]:
    """LaVIN's prefix: "Image: " before each run of image placeholders; without any, "Image: N/A" at the head of
    the first user turn."""
    if any(IMAGE_TOKEN in v for v in values):
        return [_IMAGE_RUN.sub(lambda m: IMAGE_PREFIX + m.group(0), v) for v in values]
    first = next((k for k, r in enumerate(roles) if r == "user"), None)
    return values if first is None else [NO_IMAGE_PREFIX + v if k == first else v for k, v in enumerate(values)]


def _outcome(f, *args):
    """What `f(*args)` returns, or the DataError it raises."""
    try:
        return f(*args)
    except DataError as e:
        return e


def _same(a, b) -> bool:
    if isinstance(a, DataError) or isinstance(b, DataError):
        return isinstance(a, DataError) and isinstance(b, DataError) and (a.kind, str(a)) == (b.kind, str(b))
    return a == b


def _isolated(tokenizer, token_id: int) -> bool:
    """Whether the image token is an added token that takes no neighbouring space: then a text with one
    of it per image tokenises as the full span with that id repeated, and the processor renders that."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    if added is None or not getattr(tokenizer, "is_fast", False):
        return False
    return not (added.lstrip or added.rstrip or added.single_word or added.normalized)


def _apart(a: str, b: str) -> bool:
    """Neither string overlaps the other (no match of one can take part of the other's)."""
    return (
        a not in b
        and b not in a
        and not any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))
    )
