"""An OpenAI chat-completions request → the conversation turns, images and settings `mmbridge` decodes with.

Messages become the same LLaVA-style turns `mmbridge chat` builds: the parts of a message joined by newlines,
an image part written as `<image>` (so an image then a question reads `<image>\\nquestion`, as in `chat`).
Images come only as base64 data URLs; nothing is fetched from the network. Image parts are counted before
any is decoded, and each is refused from its header if it has more than `max_pixels` pixels.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field

from PIL import Image

from mmbridge.data.images import IMAGE_FORMATS, ImageError, ImageTooLarge, decode_image
from mmbridge.models.language import IMAGE_TOKEN

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4
#: A serving limit on each image's pixels, below training's `DEFAULT_MAX_PIXELS`: a few KB of PNG can declare
#: 64 MP, 192 MB once decoded as RGB.
MAX_IMAGE_PIXELS = 4096 * 4096
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]+)*?);base64,(?P<data>.*)", re.DOTALL)


class RequestError(ValueError):
    """A request the server refuses; becomes an OpenAI-shaped error body with this HTTP status."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    turns: list[dict]  # [{"from": role, "value": text with <image> placeholders}], for Processor.encode_prompt
    images: list[Image.Image] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes):
    """A request body → its JSON value; strict JSON only (no NaN or Infinity), however deeply nested."""

    def constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(raw, parse_constant=constant)
    except RecursionError as e:
        raise RequestError("the request body is nested too deeply") from e
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError among them
        raise RequestError(f"the request body is not valid JSON: {e}") from e


def parse_chat_request(
    body, max_images: int, special_tokens: list[str], max_pixels: int | None = MAX_IMAGE_PIXELS
) -> ChatRequest:
    """Check an OpenAI `/v1/chat/completions` body and read it; `special_tokens` may not appear in any text.
    Images are decoded only once they are counted, each refused from its header beyond `max_pixels`."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(f"n={_show(n)}: this server returns one choice per request (n=1)", "n", "unsupported_value")
    for key in ("logprobs", "tools", "functions"):
        if body.get(key):
            raise RequestError(f"{key!r} is not supported by this server", key, "unsupported_parameter")
    sources: list[tuple[object, str]] = []  # each image part's url and where it is, in order
    turns = _turns(body.get("messages"), sources, special_tokens)
    if len(sources) > max_images:
        raise RequestError(
            f"{len(sources)} images in the request; this server takes at most {max_images}",
            "messages",
            "too_many_images",
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(f"stream={_show(stream)}: expected true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    settings = dict(
        max_tokens=None if limit is None else int(_number(limit, param, 1, None, integer=True)),
        temperature=_number(body.get("temperature", 1.0), "temperature", 0.0, 2.0),
        top_p=_number(body.get("top_p", 1.0), "top_p", 0.0, 1.0, open_low=True),
        seed=None
        if body.get("seed") is None
        else int(_number(body["seed"], "seed", -(2**63), 2**64 - 1, integer=True)),
        stop=_stops(body.get("stop")),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )
    return ChatRequest(turns=turns, images=[_image(url, where, max_pixels) for url, where in sources], **settings)


def _number(value, param: str, low, high, integer: bool = False, open_low: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"{param}={_show(value)}: expected {'an integer' if integer else 'a finite number'}", param)
    if (low is not None and (value <= low if open_low else value < low)) or (high is not None and value > high):
        lo, hi = ("-inf" if low is None else low), ("inf" if high is None else high)
        bounds = f"{'(' if open_low else '['}{lo}, {hi}]"
        raise RequestError(f"{param}={_show(value)}: expected a value in {bounds}", param)
    return value


def _show(value) -> str:
    """A client's value, short, for an error message; a list or object by its kind only (its repr could be
    megabytes, or nest deeper than Python's recursion limit)."""
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _stops(stop) -> list[str]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(f"stop={_show(stop)}: expected a non-empty string or a list of at most {MAX_STOPS}", "stop")
    return stops


def _turns(messages, sources: list, special_tokens: list[str]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    turns = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or msg["role"] not in ROLES:
            raise RequestError(f"{where}: expected an object whose role is one of {sorted(ROLES)}", where)
        role = ROLES[msg["role"]]
        content = msg.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise RequestError(f"{where}.content: expected a string or a list of content parts", f"{where}.content")
        pieces = [_part(part, f"{where}.content[{k}]", role, sources, special_tokens) for k, part in enumerate(parts)]
        turns.append({"from": role, "value": "\n".join(pieces)})
    return turns


def _part(part, where: str, role: str, sources: list, special_tokens: list[str]) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        text = part["text"]
        if IMAGE_TOKEN in text:
            raise RequestError(f"{where}: the text contains {IMAGE_TOKEN!r}; send images as image_url parts", where)
        token = next((t for t in special_tokens if t in text), None)
        if token is not None:
            raise RequestError(f"{where}: the text contains the special token {token!r}", where)
        return text
    if kind == "image_url":
        if role != "user":
            raise RequestError(f"{where}: images are accepted in user messages only", where)
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        sources.append((url, where))  # decoded once all are counted
        return IMAGE_TOKEN
    got = f"type {_show(kind)}" if isinstance(kind, str) else _show(part)
    raise RequestError(f"{where}: expected a text part or an image_url part, got {got}", where)


def _image(url, where: str, max_pixels: int | None) -> Image.Image:
    if not isinstance(url, str):
        raise RequestError(f"{where}: image_url.url must be a string", where)
    if url.startswith(("http://", "https://")):
        raise RequestError(
            f"{where}: remote image URLs are not fetched; send the image as a base64 data URL "
            "(data:image/png;base64,...)",
            where,
            "invalid_image_url",
        )
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise RequestError(
            f"{where}: expected a base64 data URL (data:image/png;base64,...), got {url[:40]!r}",
            where,
            "invalid_image_url",
        )
    try:
        data = base64.b64decode("".join(match["data"].split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"{where}: the data URL is not valid base64 ({e})", where, "invalid_base64") from e
    try:
        return decode_image(data, name=where, max_pixels=max_pixels, formats=IMAGE_FORMATS)
    except ImageTooLarge as e:
        raise RequestError(f"{where}: {e.reason}", where, "image_too_large") from e
    except ImageError as e:
        raise RequestError(f"{where}: {e.reason}", where, "invalid_image") from e
