"""`mmbridge serve` under hostile or careless clients (issue #29): one request cannot fail others, stall the
generation thread or make the server decode, read or queue without bound; refusals are OpenAI-shaped errors and
failures say nothing of their cause to the client. On the suite's untrained tiny model (replies are not checked
here; tests/test_serve.py checks them on a trained run), with real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import copy
import io
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from benchmarks._common import data_url, png_header
from mmbridge.serve.engine import Engine, Job
from mmbridge.serve.request import ROLES, RequestError, parse_chat_request
from mmbridge.serve.text import ReplyText

KEY = "sekrit-key"
WAIT_S = 60  # the longest any wait below may take before the test fails (it never has to take long)


def wait_until(condition, what: str) -> None:
    """Wait for `condition()` (set by another thread); fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@contextmanager
def serving(app):
    """`app` on a uvicorn server in a thread, on a free loopback port; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the server started")
    assert thread.is_alive(), "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)


def png(size=(32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def ask(n_images: int = 0, image: bytes | None = None, **params) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image or png())}}] * n_images + [
        {"type": "text", "text": "What is in this picture?"}
    ]
    return {"messages": [{"role": "user", "content": parts}], "temperature": 0, "max_tokens": 3, **params}


def post(base: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=WAIT_S, **kw)


def assert_error(r: httpx.Response, status: int, code: str | None = None, kind: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert code is None or error["code"] == code, error
    assert kind is None or error["type"] == kind, error
    return error


class Gate:
    """Holds each job at its first token until `release` is set: a job seen here is being decoded."""

    def __init__(self, monkeypatch):
        self.jobs: list[Job] = []
        self.entered, self.release = threading.Event(), threading.Event()
        take = Job.take

        def held(job, token, stop_ids):
            if not any(j is job for j in self.jobs):
                self.jobs.append(job)
                self.entered.set()
                assert self.release.wait(WAIT_S)
            return take(job, token, stop_ids)

        monkeypatch.setattr(Job, "take", held)


@pytest.fixture(scope="module")
def special(tiny):
    return sorted(tiny[1].tokenizer.all_special_tokens, key=len, reverse=True)


@pytest.fixture(scope="module")
def guarded(tiny):
    """A server with an API key, small limits, one request decoded at a time and none waiting."""
    from mmbridge.serve.app import create_app

    app = create_app(
        *tiny,
        "tiny",
        max_batch=1,
        max_queue=0,
        max_images=2,
        max_tokens=4,
        max_body=64 * 1024,
        max_image_pixels=64 * 64,
        api_key=KEY,
    )
    with serving(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def open_server(tiny):
    """A server without a key and with the default body limit, one request preparing at a time, short replies; its
    own copy of the processor (`app.state.processor`), so a test may watch it without seeing other servers' work."""
    from mmbridge.serve.app import create_app

    own = copy.copy(tiny[1])
    app = create_app(tiny[0], own, "tiny", max_batch=4, max_images=2, max_tokens=2, prepare_workers=1)
    app.state.processor = own
    with serving(app) as base:
        yield base, app


# -- the request: images counted, then sized from their headers, then decoded ------------------------------------


def test_images_are_counted_before_any_is_decoded(monkeypatch, special):
    """Every image was decoded (up to 64 MP each) before `max_images` was checked."""
    from mmbridge.serve import request

    decoded = []
    monkeypatch.setattr(request, "decode_image", lambda *a, **kw: decoded.append(a) or Image.new("RGB", (8, 8)))
    with pytest.raises(RequestError) as e:
        parse_chat_request(ask(3), max_images=2, special_tokens=special)
    assert e.value.code == "too_many_images" and decoded == []
    assert len(parse_chat_request(ask(2), max_images=2, special_tokens=special).images) == len(decoded) == 2


def test_image_size_is_refused_from_the_header(monkeypatch, special):
    """A few dozen bytes of PNG declaring 5000x5000 pixels (25 MP: within training's 64 MP limit, beyond the
    server's 16 MP) is refused with nothing decoded; a smaller configured limit applies the same way."""
    from PIL import ImageFile

    loads = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or load(self))
    with pytest.raises(RequestError) as e:
        parse_chat_request(ask(1, png_header(5000, 5000)), max_images=2, special_tokens=special)
    assert (e.value.code, e.value.param, loads) == ("image_too_large", "messages[0].content[0]", [])
    with pytest.raises(RequestError, match="1089 pixels exceeds the limit of 1024") as e:
        parse_chat_request(ask(1, png((33, 33))), max_images=2, special_tokens=special, max_pixels=32 * 32)
    assert e.value.code == "image_too_large" and loads == []
    assert parse_chat_request(ask(1, png((32, 32))), 2, special, max_pixels=32 * 32).images[0].size == (32, 32)


def test_a_huge_prompt_is_refused_before_it_is_tokenised(open_server, monkeypatch):
    """A prompt far beyond max_length in characters is refused without being tokenised (2 MB took seconds)."""
    engine = open_server[1].state.engine
    encoded = []
    encode = engine.encode_prompt
    monkeypatch.setattr(engine, "encode_prompt", lambda *a: encoded.append(1) or encode(*a))
    body = {"messages": [{"role": "user", "content": "shape " * 400_000}]}
    assert_error(post(open_server[0], body, key=None), 400, "context_length_exceeded")
    assert encoded == []


def test_chat_template_refusal_is_a_400(open_server, tiny, monkeypatch):
    """A chat template that raises (roles out of order, a role it does not know) was a plain-text 500."""
    tokenizer = tiny[1].tokenizer
    monkeypatch.setattr(
        tokenizer,
        "chat_template",
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System messages are not supported') }}{% endif %}{{ m['content'] }}"
        "{% endfor %}",
    )
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    error = assert_error(post(open_server[0], body, key=None), 400, "invalid_conversation")
    assert "System messages are not supported" in error["message"] and error["param"] == "messages"


# -- the guard: host, key, content type, body size, requests in flight ------------------------------------------


def test_host_header_must_name_this_server(guarded):
    base = guarded[0]
    port = base.rsplit(":", 1)[1]
    key = {"authorization": f"Bearer {KEY}"}
    for host in ["evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"]:  # DNS rebinding
        assert_error(httpx.get(f"{base}/v1/models", headers={**key, "host": host}), 400, "invalid_host")
    for host in [f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", f"[::1]:{port}"]:
        assert httpx.get(f"{base}/v1/models", headers={**key, "host": host}).status_code == 200, host


def test_api_key_is_required_when_set(guarded):
    base = guarded[0]
    for headers in [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": KEY},
        {"authorization": f"Basic {KEY}"},
        {"authorization": f"Bearer {KEY}x"},
    ]:
        r = httpx.get(f"{base}/v1/models", headers=headers)
        assert_error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    assert_error(post(base, ask(), key="wrong"), 401, "invalid_api_key")
    assert httpx.get(f"{base}/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert post(base, ask()).status_code == 200


def test_body_must_be_json_and_within_the_limit(guarded):
    """A web page may POST text/plain to a loopback server without asking (no CORS preflight); a body had no limit."""
    base, key = guarded[0], {"authorization": f"Bearer {KEY}"}
    raw = json.dumps(ask()).encode()
    for kind in [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]:
        r = httpx.post(
            f"{base}/v1/chat/completions", content=raw, headers={**key, **({"content-type": kind} if kind else {})}
        )
        assert_error(r, 415, "unsupported_media_type")
    json_type = {**key, "content-type": "application/json; charset=utf-8"}
    assert httpx.post(f"{base}/v1/chat/completions", content=raw, headers=json_type, timeout=WAIT_S).status_code == 200
    big = json.dumps({**ask(), "user": "x" * 70_000}).encode()
    assert_error(httpx.post(f"{base}/v1/chat/completions", content=big, headers=json_type), 413, "request_too_large")
    chunks = (big[i : i + 8192] for i in range(0, len(big), 8192))  # no Content-Length: counted as it arrives
    assert_error(httpx.post(f"{base}/v1/chat/completions", content=chunks, headers=json_type), 413, "request_too_large")


def test_a_full_server_answers_503_with_retry_after(guarded, monkeypatch):
    """max_batch 1 and max_queue 0: while one request is decoded, the next is turned away at once (the queue was
    unbounded), told to come back when those in flight should be done, and once it is answered there is room."""
    gate, first = Gate(monkeypatch), []
    held = threading.Thread(target=lambda: first.append(post(guarded[0], ask())))
    held.start()
    try:
        assert gate.entered.wait(WAIT_S)
        monkeypatch.setattr(guarded[1].state.engine, "batch_seconds", 6.5)  # as if batches took 6.5 s
        r = post(guarded[0], ask())
    finally:
        gate.release.set()
        held.join(WAIT_S)
    assert_error(r, 503, "overloaded", "server_error")
    assert r.headers["retry-after"] == "7"  # one batch ahead
    assert first[0].status_code == 200
    assert post(guarded[0], ask()).status_code == 200


def test_a_plain_request_ends_when_its_client_disconnects(guarded, monkeypatch):
    """A non-streamed request whose client went away kept its batch row until max_tokens."""
    gate = Gate(monkeypatch)
    body = json.dumps(ask(max_tokens=4)).encode()
    port = int(guarded[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        assert gate.entered.wait(WAIT_S)
    job = gate.jobs[0]
    try:
        wait_until(lambda: job.cancelled, "the server saw the client go")
    finally:
        gate.release.set()
    wait_until(lambda: job.finish_reason is not None, "the job ended")
    assert job.generated == 1  # its first token, then the row ended


# -- failures: the batch, the thread and the client's view --------------------------------------------------------


def job_for(engine, proc, done: dict, name: str, notify=None, **kw) -> Job:
    prompt = proc.encode_prompt([{"from": "human", "value": "<image>\nWhat is this?"}])
    pixels = proc.images([Image.new("RGB", (32, 32), (0, 90, 200))])["pixel_values"]
    event = threading.Event()
    done[name] = (event, [])

    def told(kind, value):
        done[name][1].append(kind)
        if kind != "delta":
            event.set()

    return Job(prompt, pixels, 3, ReplyText(engine.decode), notify or told, **kw)


def test_one_job_cannot_fail_its_batch_or_the_engine(tiny):
    """A 1e-300 temperature, a seed torch refuses and a notify callback that raises each failed every job batched
    with them (the callback's second raise, in the error path, ended the engine thread: later jobs hung)."""
    model, proc = tiny
    engine = Engine(model, proc, max_batch=4, start=False)
    done: dict = {}

    def broken(kind, value):
        done["broken"][1].append(kind)
        raise RuntimeError("the client's event loop is closed")

    done["broken"] = (threading.Event(), [])
    jobs = [
        job_for(engine, proc, done, "greedy"),
        job_for(engine, proc, done, "tiny_t", temperature=1e-300),
        job_for(engine, proc, done, "bad_seed", temperature=1.0, seed=2**70),
    ]
    jobs.insert(0, Job(jobs[0].prompt, jobs[0].pixels, 3, ReplyText(engine.decode), broken))  # first in the batch
    with pytest.raises(ValueError, match="temperature"):
        engine.submit(job_for(engine, proc, done, "nan", temperature=float("nan")))
    for job in jobs:
        engine.submit(job)
    engine.start()
    try:
        for name in ["greedy", "tiny_t", "bad_seed"]:
            assert done[name][0].wait(WAIT_S), name
        assert done["greedy"][1][-1] == done["tiny_t"][1][-1] == "done"
        assert jobs[2].reply.text == jobs[1].reply.text  # a tiny temperature is greedy
        assert done["bad_seed"][1] == ["error"] and done["broken"][1]
        later = job_for(engine, proc, done, "later")
        engine.submit(later)
        assert done["later"][0].wait(WAIT_S) and done["later"][1][-1] == "done"
        assert engine._thread.is_alive()
    finally:
        engine.close()


def test_decoding_does_not_wait_for_a_prompt_being_tokenised(tiny, monkeypatch):
    """Request threads tokenised under the lock the generation thread decoded with: a multi-MB prompt held up
    every running batch."""
    model, proc = tiny
    engine = Engine(model, proc, start=False)
    entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(proc, "encode_prompt", lambda *a: entered.set() or release.wait() or [1])  # until `finally`
    encoding = threading.Thread(target=engine.encode_prompt, args=([{"from": "human", "value": "hi"}],))
    encoding.start()
    try:
        assert entered.wait(WAIT_S)
        ids = proc.tokenizer("a square and a circle", add_special_tokens=False)["input_ids"]
        decoded = []
        decoding = threading.Thread(target=lambda: decoded.append(engine.decode(ids)), daemon=True)
        decoding.start()
        decoding.join(WAIT_S)
        assert decoded == ["a square and a circle"]
    finally:
        release.set()
        encoding.join(WAIT_S)


def test_requests_prepare_a_few_at_a_time(open_server, monkeypatch):
    """Up to 40 requests (the thread pool's size) decoded images at once; now `prepare_workers` (1 here)."""
    base, app = open_server
    proc = app.state.processor  # this server's alone: a request another test's server still prepares is not counted
    inside, release = [], threading.Event()
    images = proc.images

    def held(batch):
        inside.append(1)
        assert release.wait(WAIT_S)
        return images(batch)

    monkeypatch.setattr(proc, "images", held)
    threads = [threading.Thread(target=post, args=(base, ask(1)), kwargs={"key": None}) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(
            lambda: len(inside) == 2 or app.state.preparing.statistics().tasks_waiting == 1,
            "the second request waits, or prepares beside the first",
        )
        assert len(inside) == 1
    finally:
        release.set()
        for t in threads:
            t.join(WAIT_S)
    assert len(inside) == 2


def test_failures_reach_clients_as_generic_500s(open_server, tiny, monkeypatch, caplog):
    """Exception text (a CUDA OOM message, paths, shapes) went to clients; a failure outside generation was a
    plain-text 500. Now every one is an OpenAI-shaped 500 that says only that it failed; the log has the detail."""
    model = tiny[0]
    base, app = open_server
    proc = app.state.processor

    def out_of_memory(*a, **kw):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; SECRET-DETAIL)")

    monkeypatch.setattr(model, "generate", out_of_memory)
    caplog.set_level(logging.ERROR)
    error = assert_error(post(base, ask(1), key=None), 500, kind="server_error")
    assert "SECRET" not in json.dumps(error)
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=ask(1, stream=True), timeout=WAIT_S) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2][6:])["error"]["type"] == "server_error" and events[-1] == "data: [DONE]"
    assert not any("SECRET" in e for e in events)
    assert "SECRET-DETAIL" in caplog.text  # the server's log has it

    monkeypatch.undo()
    monkeypatch.setattr(proc, "images", lambda images: (_ for _ in ()).throw(KeyError("SECRET-PATH")))
    error = assert_error(post(base, ask(1), key=None), 500, kind="server_error")
    assert "SECRET" not in json.dumps(error)
    monkeypatch.undo()
    assert post(base, ask(1), key=None).status_code == 200
    assert torch.is_tensor(proc.images([Image.new("RGB", (32, 32))])["pixel_values"])


# -- generated requests: every answer well-formed, the server still up ---------------------------------------------

FIELDS = [
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "tools",
    "model",
    "user",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(FIELDS),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS), inner, max_size=4)
    ),
    max_leaves=10,
)
hostile_urls = (
    st.sampled_from(
        [
            data_url(png_header(5000, 5000)),
            data_url(b"not an image"),
            "data:image/png;base64,*!",
            "https://example.com/a.png",
            "file:///etc/passwd",
            data_url(png((8, 200))),
            "",
        ]
    )
    | st.text()
)


@st.composite
def mutated_requests(draw) -> dict:
    """A valid request (0-3 images, streamed or not), then a few changes of any kind."""
    body = ask(draw(st.integers(0, 3)), max_tokens=draw(st.integers(1, 3)), stream=draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        msgs = body.get("messages")
        first = msgs[0] if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) else {}
        parts = first.get("content")
        where = draw(st.sampled_from(["field", "drop", "role", "part", "url", "number", "extra_message", "pad"]))
        if where == "field":
            body[draw(st.sampled_from(FIELDS))] = draw(json_values)
        elif where == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif where == "role" and first:
            first["role"] = draw(
                st.sampled_from(["system", "developer", "assistant", "tool", "function", ""]) | json_values
            )
        elif where == "part" and isinstance(parts, list) and parts:
            parts[draw(st.integers(0, len(parts) - 1))] = draw(json_values)
        elif where == "url" and isinstance(parts, list) and parts and isinstance(parts[0], dict):
            parts[0] = {"type": "image_url", "image_url": {"url": draw(hostile_urls)}}
        elif where == "number":
            body[draw(st.sampled_from(["temperature", "top_p", "seed", "max_tokens"]))] = draw(
                st.sampled_from([float("nan"), float("inf"), -0.0, 1e-300, 2**64, -(2**63) - 1, 10**30]) | st.floats()
            )
        elif where == "extra_message" and isinstance(msgs, list):
            msgs.insert(
                draw(st.integers(0, len(msgs))),
                {
                    "role": draw(st.sampled_from(list(ROLES) + ["tool"])),
                    "content": draw(st.text(max_size=20) | json_values),
                },
            )
        elif where == "pad":  # beyond the fuzzed server's 8 KB body limit, or not
            body["user"] = "x" * draw(st.sampled_from([100, 9000]))
    return body


@pytest.fixture(scope="module")
def fuzzed(tiny):
    from mmbridge.serve.app import create_app

    app = create_app(*tiny, "tiny", max_batch=4, max_images=2, max_tokens=2, max_body=8 * 1024)
    with serving(app) as base, httpx.Client(base_url=base, timeout=WAIT_S) as client:
        yield client, app


def assert_well_formed(r: httpx.Response, streamed: bool) -> None:
    assert r.status_code in (200, 400, 413, 503), (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert_error(r, r.status_code)
    elif streamed and r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert all("choices" in json.loads(e) for e in events[:-1]), events  # no error event: nothing failed
    else:
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)


@settings(max_examples=150, deadline=None)
@given(body=st.integers(0, 9).flatmap(lambda k: json_values if k == 0 else mutated_requests()))  # mostly near-valid
@example(body=float("nan"))
@example(body={"messages": [{"role": "user", "content": [[[[[[[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]]]]]]}]})
def test_generated_requests_get_well_formed_answers(fuzzed, body):
    client, app = fuzzed
    raw = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity as Python writes them
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_well_formed(r, isinstance(body, dict) and body.get("stream") is True)
    assert app.state.engine._thread.is_alive()


def test_the_server_stays_up_after_hostile_bytes(fuzzed):
    client, app = fuzzed
    for raw in [b"[" * 200_000, b'{"messages": "' + b"\\ud800" * 10 + b'"}', b"\x00" * 100, b"{" * 50 + b"}" * 50]:
        assert_well_formed(
            client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), False
        )
    assert client.get("/v1/models").status_code == 200 and app.state.engine._thread.is_alive()
