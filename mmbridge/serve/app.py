"""The FastAPI app: OpenAI's `POST /v1/chat/completions` (plain or streamed as server-sent events) and
`GET /v1/models`, over one `Engine`, behind a `Guard` (host, API key, content type, body size, requests in
flight). Errors are OpenAI-shaped: `{"error": {message, type, param, code}}`; a refused request is a 4xx with
its reason, anything else a 500 that says no more than that (the detail goes to the server's log)."""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager

import anyio
import jinja2
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mmbridge.models.language import IMAGE_TOKEN
from mmbridge.serve.engine import Engine, Job
from mmbridge.serve.guard import LOOPBACK_HOSTS, MAX_BODY_BYTES, Guard, error_body
from mmbridge.serve.request import MAX_IMAGE_PIXELS, ChatRequest, RequestError, parse_chat_request, parse_json
from mmbridge.serve.text import ReplyText

FAILED = "the server failed to answer this request; the reason is in its log"
# a prompt's text beyond max_length x (the longest token's characters) x this cannot fit, and is refused unread
CHARS_PER_TOKEN_SLACK = 4


def create_app(
    model,
    processor,
    name: str,
    max_batch: int = 8,
    max_images: int = 4,
    max_tokens: int = 256,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    max_body: int = MAX_BODY_BYTES,
    max_queue: int = 64,
    api_key: str | None = None,
    allowed_hosts=LOOPBACK_HOSTS,
    prepare_workers: int = 4,
) -> FastAPI:
    """The server for one loaded run, answering as model `name`. A reply is at most `max_tokens` tokens
    (a request may ask for fewer) and, with its prompt, fits in the processor's `max_length`.

    Limits: `max_images` images a request, each at most `max_image_pixels` pixels (from its header, before it is
    decoded); a body of at most `max_body` bytes; `max_batch` requests decoded together and `max_queue` more
    waiting (beyond that, 503 with Retry-After); `prepare_workers` requests decoding images and tokenising at
    once. `api_key`: required as a Bearer token when set. `allowed_hosts`: the Host header's allowed names."""
    engine = Engine(model, processor, max_batch=max_batch)
    special = sorted(set(processor.tokenizer.all_special_tokens) - {IMAGE_TOKEN}, key=len, reverse=True)
    longest = max(map(len, processor.tokenizer.get_vocab()), default=1)
    max_chars = processor.max_length * longest * CHARS_PER_TOKEN_SLACK
    preparing = anyio.CapacityLimiter(prepare_workers)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="mmbridge", lifespan=lifespan)
    app.state.engine, app.state.preparing = engine, preparing
    app.add_middleware(
        Guard,
        allowed_hosts=allowed_hosts,
        api_key=api_key,
        max_body=max_body,
        max_in_flight=max_batch + max_queue,  # Retry-After: when those in flight are decoded
        retry_after=lambda n: min(60, max(1, math.ceil(engine.wait_estimate(n)))),
    )

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return JSONResponse(
            RequestError(str(e.detail), code=str(e.status_code), status=e.status_code).body(), status_code=e.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse(RequestError(str(e.errors())[:500]).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _failed(request: Request, e: Exception):  # Starlette logs the exception after this answer
        return JSONResponse(error_body(FAILED, "server_error"), status_code=500)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "mmbridge"}]}

    def prepare(raw: bytes) -> tuple[ChatRequest, list[int], object, list, dict | None]:
        """Parse and encode a request (on a worker thread: image decoding and tokenising take a while)."""
        try:
            req = parse_chat_request(parse_json(raw), max_images, special, max_image_pixels)
        except RecursionError as e:
            raise RequestError("the request body is nested too deeply") from e
        if (chars := sum(len(t["value"]) for t in req.turns)) > max_chars:
            raise RequestError(
                f"the messages hold {chars} characters, more than this model's max_length of "
                f"{processor.max_length} tokens can take",
                "messages",
                "context_length_exceeded",
            )
        views = processor.images(req.images) if req.images else None  # under a tiling: each image's own count
        req.images = []  # decoded once; the pixels below are what is kept
        try:
            prompt = engine.encode_prompt(req.turns, views.get("counts") if views else None)
        except jinja2.TemplateError as e:
            raise RequestError(
                f"the model's chat template rejects this conversation: {e}", "messages", "invalid_conversation"
            ) from e
        if len(prompt) > processor.max_length:
            each = (
                "each image counts by its size"
                if processor.tiling.varies
                else f"each image counts {processor.num_image_tokens}"
            )
            raise RequestError(
                f"the prompt is {len(prompt)} tokens ({each}), beyond this model's max_length of "
                f"{processor.max_length}",
                "messages",
                "context_length_exceeded",
            )
        pixels = views["pixel_values"] if views else None
        return req, prompt, pixels, engine.instruction_ids(req.turns), views if processor.tiling.varies else None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        req, prompt, pixels, instructions, views = await anyio.to_thread.run_sync(prepare, raw, limiter=preparing)
        room = max(1, processor.max_length - len(prompt))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(
            prompt=prompt,
            pixels=pixels,
            instructions=instructions,
            images=views,
            max_new_tokens=min(req.max_tokens or max_tokens, max_tokens, room),
            reply=ReplyText(engine.decode, req.stop),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            notify=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)),
        )
        engine.submit(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if req.stream:  # Starlette ends the stream when the client goes, and `_stream` then cancels the job
            return StreamingResponse(_stream(job, events, meta, req.include_usage), media_type="text/event-stream")
        watch = asyncio.create_task(_cancel_when_gone(request, job))
        try:
            while (event := await events.get())[0] == "delta":
                pass
        finally:
            watch.cancel()
        if event[0] == "error":  # the engine logged it
            return JSONResponse(error_body(FAILED, "server_error"), status_code=500)
        return {
            **meta,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": job.reply.text},
                    "finish_reason": job.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(job),
        }

    return app


async def _cancel_when_gone(request: Request, job: Job) -> None:
    """Cancel `job` once its client disconnects (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled = True


def _usage(job: Job) -> dict:
    return {
        "prompt_tokens": len(job.prompt),
        "completion_tokens": job.generated,
        "total_tokens": len(job.prompt) + job.generated,
    }


async def _stream(job: Job, events: asyncio.Queue, meta: dict, include_usage: bool):
    """Server-sent events in OpenAI's chunk format: the role, the text pieces, the finish reason, (the usage),
    then `data: [DONE]`. A client that goes away ends its row at the next token."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (event := await events.get())[0] == "delta":
            yield chunk({"content": event[1]})
        if event[0] == "error":  # the engine logged it
            yield f"data: {json.dumps(error_body(FAILED, 'server_error'))}\n\n"
        else:
            yield chunk({}, job.finish_reason)
            if include_usage:
                usage = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(job)}
                yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # no effect once the reply has ended
