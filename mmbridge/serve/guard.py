"""What a request must pass before the app reads it, as one ASGI middleware: the Host header (against DNS
rebinding), the API key, and for a POST the JSON content type, room among the requests in flight (503 with
`Retry-After`, before the body is read) and the body's size (413, counted as it arrives). Refusals are
OpenAI-shaped errors like the app's own."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from starlette.datastructures import Headers

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MAX_BODY_BYTES = 20 * 1024 * 1024


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Guard:
    """ASGI middleware in front of the server's app.

    `allowed_hosts`: the names the Host header may carry (any port); `"*"` allows any, `"*.example.com"` that
    domain's subdomains. `api_key`: if set, every request must send `Authorization: Bearer <key>` (compared in
    constant time). `max_body`: bytes a POST body may have. `max_in_flight`: POSTs being read, prepared, queued
    or decoded at once; one more gets 503 with `Retry-After: retry_after(in flight)` seconds."""

    def __init__(
        self,
        app,
        allowed_hosts=LOOPBACK_HOSTS,
        api_key: str | None = None,
        max_body: int = MAX_BODY_BYTES,
        max_in_flight: int = 72,
        retry_after: Callable[[int], int] = lambda in_flight: 1,
    ):
        self.app, self.max_body, self.max_in_flight, self.retry_after = app, max_body, max_in_flight, retry_after
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key is empty: give a key, or None for no key")
        self.hosts = {h.lower().rstrip(".") for h in allowed_hosts}
        self.key = None if api_key is None else api_key.encode()
        self.in_flight = 0  # read and changed on the event loop's thread only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if not self._host_ok(headers.get("host")):
            return await _refuse(
                send,
                400,
                "the Host header names a host this server does not answer to (see --allowed-hosts)",
                code="invalid_host",
            )
        if self.key is not None and not self._key_ok(headers.get("authorization", "")):
            return await _refuse(
                send,
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                extra=[(b"www-authenticate", b"Bearer")],
            )
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            return await _refuse(
                send,
                415,
                f"the body must be sent as application/json, not {media[:60]!r}",
                code="unsupported_media_type",
            )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await self._too_large(send)
        if self.in_flight >= self.max_in_flight:
            wait = str(self.retry_after(self.in_flight)).encode()
            return await _refuse(
                send,
                503,
                "the server is busy; retry after a moment",
                kind="server_error",
                code="overloaded",
                extra=[(b"retry-after", wait)],
            )
        self.in_flight += 1
        try:
            body = await self._body(receive)
            if body is None:  # the client left while sending
                return
            if len(body) > self.max_body:
                return await self._too_large(send)
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1

    def _host_ok(self, host: str | None) -> bool:
        if "*" in self.hosts:
            return True
        if not host:
            return False
        host = host.strip().lower()
        name = (
            host[1 : host.find("]")]
            if host.startswith("[")
            else host.rsplit(":", 1)[0]
            if host.count(":") == 1
            else host
        )
        name = name.rstrip(".")
        return name in self.hosts or any(h.startswith("*.") and name.endswith(h[1:]) for h in self.hosts)

    def _key_ok(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)

    async def _body(self, receive) -> bytes | None:
        """The whole body, or as much as one byte past `max_body` (then the caller refuses it)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body or not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send):
        return await _refuse(
            send,
            413,
            f"the request body is larger than this server's limit of {self.max_body} bytes",
            code="request_too_large",
        )


def _replay(body: bytes, receive):
    """A `receive` that gives the app the body already read, then passes on what comes next (a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(
    send,
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    code: str | None = None,
    extra: list | None = None,
) -> None:
    content = json.dumps(error_body(message, kind, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
