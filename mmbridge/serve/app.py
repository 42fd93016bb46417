"""The FastAPI app: OpenAI's `POST /v1/chat/completions` (plain or streamed as server-sent events) and
`GET /v1/models`, over one `Engine`. Errors are OpenAI-shaped: `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mmbridge.models.language import IMAGE_TOKEN
from mmbridge.serve.engine import Engine, Job
from mmbridge.serve.request import ChatRequest, RequestError, parse_chat_request
from mmbridge.serve.text import ReplyText


def create_app(model, processor, name: str, max_batch: int = 8, max_images: int = 4,
               max_tokens: int = 256) -> FastAPI:
    """The server for one loaded run, answering as model `name`. A reply is at most `max_tokens` tokens
    (a request may ask for fewer) and, with its prompt, fits in the processor's `max_length`."""
    engine = Engine(model, processor, max_batch=max_batch)
    special = sorted(set(processor.tokenizer.all_special_tokens) - {IMAGE_TOKEN}, key=len, reverse=True)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="mmbridge", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def _refused(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return JSONResponse(RequestError(str(e.detail), code=str(e.status_code), status=e.status_code).body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse(RequestError(str(e.errors())[:500]).body(), status_code=400)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "mmbridge"}]}

    def prepare(body) -> tuple[ChatRequest, list[int], object, list, dict | None]:
        """Parse and encode a request (on a worker thread: image decoding and tokenising take a while)."""
        req = parse_chat_request(body, max_images, special)
        views = processor.images(req.images) if req.images else None  # under a tiling: each image's own count
        prompt = engine.encode_prompt(req.turns, views.get("counts") if views else None)
        if len(prompt) > processor.max_length:
            each = "each image counts by its size" if processor.tiling.varies else \
                f"each image counts {processor.num_image_tokens}"
            raise RequestError(f"the prompt is {len(prompt)} tokens ({each}), beyond this model's max_length of "
                               f"{processor.max_length}", "messages", "context_length_exceeded")
        pixels = views["pixel_values"] if views else None
        return req, prompt, pixels, engine.instruction_ids(req.turns), views if processor.tiling.varies else None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from e
        req, prompt, pixels, instructions, views = await run_in_threadpool(prepare, body)
        room = max(1, processor.max_length - len(prompt))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(prompt=prompt, pixels=pixels, instructions=instructions, images=views,
                  max_new_tokens=min(req.max_tokens or max_tokens, max_tokens, room),
                  reply=ReplyText(engine.decode, req.stop), temperature=req.temperature, top_p=req.top_p,
                  seed=req.seed, notify=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
        engine.submit(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if req.stream:
            return StreamingResponse(_stream(job, events, meta, req.include_usage), media_type="text/event-stream")
        while (event := await events.get())[0] == "delta":
            pass
        if event[0] == "error":
            raise RequestError(f"generation failed: {event[1]}", status=500, kind="server_error")
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.reply.text},
                             "finish_reason": job.finish_reason, "logprobs": None}],
                "usage": _usage(job)}

    return app


def _usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": job.generated,
            "total_tokens": len(job.prompt) + job.generated}


async def _stream(job: Job, events: asyncio.Queue, meta: dict, include_usage: bool):
    """Server-sent events in OpenAI's chunk format: the role, the text pieces, the finish reason, (the usage),
    then `data: [DONE]`. A client that goes away ends its row at the next token."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (event := await events.get())[0] == "delta":
            yield chunk({"content": event[1]})
        if event[0] == "error":
            error = RequestError(f"generation failed: {event[1]}", status=500, kind="server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
        else:
            yield chunk({}, job.finish_reason)
            if include_usage:
                usage = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(job)}
                yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # no effect once the reply has ended
