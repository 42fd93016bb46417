"""`mmbridge serve`: a real uvicorn server on loopback over a tiny trained run, spoken to over HTTP, with
httpx and with the `openai` client; replies checked against `mmbridge chat` and `MultimodalLM.generate`."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from mmbridge.cli import main
from tests.conftest import Choices, one_step_run, save_tiny_llama

QUESTION = "What is in this picture?"
MAX_IMAGES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def untied_lm_dir(tmp_path_factory, tokenizer) -> str:
    """The suite's tiny Llama with its own output layer: the tied one's greedy replies collapse to one repeated
    token after training, so replies to different requests could not be told apart."""
    return save_tiny_llama(tmp_path_factory.mktemp("untied_llama"), tokenizer, tied=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, untied_lm_dir, tiny_clip_dir, world) -> Path:
    """A run trained by the real engine: one small step per stage, so replies still differ per request."""
    return one_step_run(tmp_path_factory.mktemp("serve") / "tiny-run", untied_lm_dir, tiny_clip_dir, world["root"])


@pytest.fixture(scope="module")
def loaded(run_dir):
    from mmbridge.runs import load_run

    return load_run(run_dir, device="cpu")


@pytest.fixture(scope="module")
def server(loaded):
    """A uvicorn server in a thread on a free loopback port; yields (base URL, app)."""
    import uvicorn

    from mmbridge.serve.app import create_app

    model, processor = loaded
    app = create_app(model, processor, "tiny-run", max_batch=4, max_images=MAX_IMAGES, max_tokens=32)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{srv.config.port}", app
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def images(world) -> list[Path]:
    return sorted(Path(world["images"]).rglob("*.png"))[:4]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(image: Path | None, question: str = QUESTION, **params) -> dict:
    parts = ([{"type": "image_url", "image_url": {"url": data_url(image)}}] if image else []) + [
        {"type": "text", "text": question}
    ]
    return {"messages": [{"role": "user", "content": parts}], **params}


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=60)


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def reply_alone(loaded, image: Path | None, question: str, max_new_tokens: int) -> tuple[list[int], str]:
    """`MultimodalLM.generate` on one request by itself: its tokens, and its reply as the server words it. No greedy
    choice is near a tie (`Choices`), so a batch's or another process's rounding cannot change the reply."""
    from mmbridge.data.images import load_image

    model, proc = loaded
    pixels = proc.images([load_image(image)])["pixel_values"] if image else None
    prompt = proc.encode_prompt([{"from": "human", "value": f"<image>\n{question}" if image else question}])
    with Choices(model) as choices:
        tokens = model.generate(
            torch.tensor([prompt]),
            torch.ones(1, len(prompt), dtype=torch.long),
            pixels,
            max_new_tokens,
            proc.stop_token_ids,
        )[0]
    choices.assert_clear()
    return tokens, proc.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def stream(server, body: dict) -> list[dict | str]:
    """The SSE events of a streamed request: parsed chunks, and the final "[DONE]" as a string."""
    events = []
    with httpx.stream("POST", f"{server[0]}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_models_lists_the_run(server):
    r = httpx.get(f"{server[0]}/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny-run"]


def test_greedy_reply_equals_mmbridge_chat(server, run_dir, images, loaded):
    _, processor = loaded
    for image in images[:2]:  # each request decoded alone, as `chat` decodes it: the same arithmetic
        want = main(
            ["chat", str(run_dir), "--image", str(image), "--max-new-tokens", "12", "--device", "cpu", QUESTION]
        )
        r = post(server, ask(image, temperature=0, max_tokens=12))
        assert content(r) == want
        body = r.json()
        prompt = processor.encode_prompt([{"from": "human", "value": f"<image>\n{QUESTION}"}])
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(prompt)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 1 <= usage["completion_tokens"] <= 12
        assert body["object"] == "chat.completion" and body["model"] == "tiny-run"
        assert body["choices"][0]["finish_reason"] == ("length" if usage["completion_tokens"] == 12 else "stop")


def test_plain_string_content_and_max_completion_tokens(server, loaded):
    r = post(
        server,
        {"messages": [{"role": "user", "content": "Describe a shape."}], "temperature": 0, "max_completion_tokens": 5},
    )
    tokens, want = reply_alone(loaded, None, "Describe a shape.", 5)
    assert content(r) == want and want
    assert r.json()["usage"]["completion_tokens"] == min(len(tokens) + 1, 5)  # a stop token counts


def test_streamed_pieces_join_to_the_reply(server, images):
    body = ask(images[0], temperature=0, max_tokens=16, stream_options={"include_usage": True})
    reply = post(server, body).json()
    events = stream(server, body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(pieces) == reply["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish == [reply["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == reply["usage"]


def test_stop_strings_cut_the_reply(server, images):
    greedy = content(post(server, ask(images[0], temperature=0, max_tokens=24)))
    words = greedy.split()
    assert len(words) >= 3, f"the tiny run's reply is too short to cut: {greedy!r}"
    stop = " " + words[2]
    want = greedy[: greedy.index(stop)].rstrip()
    r = post(server, ask(images[0], temperature=0, max_tokens=24, stop=[stop, "never-said"]))
    assert content(r) == want and r.json()["choices"][0]["finish_reason"] == "stop"
    events = stream(server, ask(images[0], temperature=0, max_tokens=24, stop=stop))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1] if c["choices"]) == want


@pytest.mark.parametrize(
    "case, param, code",
    [
        ("n", "n", "unsupported_value"),
        ("bad_base64", "messages[0].content[0]", "invalid_base64"),
        ("not_an_image", "messages[0].content[0]", "invalid_image"),
        ("remote_url", "messages[0].content[0]", "invalid_image_url"),
        ("too_many_images", "messages", "too_many_images"),
        ("too_long", "messages", "context_length_exceeded"),
        ("image_token_in_text", "messages[0].content[0]", None),
        ("temperature", "temperature", None),
        ("no_messages", "messages", None),
    ],
)
def test_refused_requests_get_openai_errors(server, images, case, param, code):
    body = ask(images[0], temperature=0)
    parts = body["messages"][0]["content"]
    if case == "n":
        body["n"] = 2
    elif case == "bad_base64":
        parts[0]["image_url"]["url"] = "data:image/png;base64,not*base64!"
    elif case == "not_an_image":
        parts[0]["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(b"plain text").decode()
    elif case == "remote_url":
        parts[0]["image_url"]["url"] = "https://example.com/cat.png"
    elif case == "too_many_images":
        parts[:0] = [parts[0]] * MAX_IMAGES
    elif case == "too_long":
        parts[1]["text"] = "shape " * 400
    elif case == "image_token_in_text":
        body["messages"][0]["content"] = "<image> what?"
    elif case == "temperature":
        body["temperature"] = 3
    elif case == "no_messages":
        body["messages"] = []
    r = post(server, body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert error["message"]


HI = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        (HI + '"temperature": NaN}').encode(),
        (HI + '"temperature": 1e999}').encode(),
        (HI + '"top_p": -Infinity}').encode(),
        (HI + '"temperature": 1e-300, "top_p": NaN}').encode(),
    ],
    ids=["syntax", "not_utf8", "deep", "deep_messages", "nan", "overflow", "minus_infinity", "nan_top_p"],
)
def test_invalid_json_and_non_finite_numbers_are_400s(server, raw):
    """Python's JSON parser reads NaN and Infinity (and 1e999 as inf); a NaN temperature passed the range check and
    failed every request batched with it. Deep nesting raised RecursionError: a plain-text 500 (issue #29)."""
    r = httpx.post(
        f"{server[0]}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_same_seed_same_sample_and_sampling_is_not_greedy(server, images):
    greedy = content(post(server, ask(images[0], temperature=0, max_tokens=12)))
    sampled = [content(post(server, ask(images[0], temperature=1.5, seed=s, max_tokens=12))) for s in range(3)]
    assert content(post(server, ask(images[0], temperature=1.5, seed=0, max_tokens=12))) == sampled[0]
    assert any(s != greedy for s in sampled)


def test_concurrent_requests_get_their_own_greedy_answers(server, images, loaded):
    requests = [(images[3], QUESTION, 12), (images[2], "How many shapes?", 10)]
    alone = [reply_alone(loaded, *r)[1] for r in requests]
    assert alone[0] != alone[1]
    bodies = [ask(image, question, temperature=0, max_tokens=n) for image, question, n in requests]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: content(post(server, b)), bodies * 2))
    assert together == alone * 2


def test_waiting_requests_are_decoded_in_one_batch(loaded, images):
    """Jobs queued while the engine is busy run as one batch, each with its own reply and settings."""
    from mmbridge.data.images import load_image, preprocess
    from mmbridge.serve.engine import Engine, Job
    from mmbridge.serve.text import ReplyText

    model, proc = loaded
    engine = Engine(model, proc, max_batch=4, start=False)
    results = []

    def job(image, question, max_new, **kw):
        prompt = proc.encode_prompt([{"from": "human", "value": f"<image>\n{question}"}])
        pixels = preprocess([load_image(image)], proc.image_size, proc.image_mean, proc.image_std)
        done = threading.Event()
        j = Job(
            prompt,
            pixels,
            max_new,
            ReplyText(engine.decode),
            lambda kind, _: done.set() if kind != "delta" else None,
            **kw,
        )
        results.append((j, done, prompt, pixels))
        return j

    asked = [(images[3], QUESTION, 8), (images[2], "How many shapes?", 5)]
    for j in (*(job(*a) for a in asked), job(images[1], QUESTION, 6, temperature=1.5, seed=4)):
        engine.submit(j)
    engine.start()
    for _, done, _, _ in results:
        assert done.wait(60)
    engine.close()
    assert engine.batch_sizes == [3]
    for (j, _, _, _), a in zip(results, asked):  # the greedy ones: as each request alone
        assert j.reply.text == reply_alone(loaded, *a)[1]
    # the sampled one: a draw near a tie could differ alone, so its draw in the same batch, with its own generator
    prompts = [prompt for _, _, prompt, _ in results]
    rows = model.generate(
        proc.pad(prompts, proc.pad_id, left=True),
        proc.left_mask(prompts),
        torch.cat([pixels for _, _, _, pixels in results]),
        8,
        proc.stop_token_ids,
        temperature=[0.0, 0.0, 1.5],
        generator=[None, None, torch.Generator().manual_seed(4)],
    )
    assert results[2][0].reply.text == proc.tokenizer.decode(rows[2][:6], skip_special_tokens=True).strip()


def test_openai_client_talks_to_the_server(server, images):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny-run"]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(images[1])}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    out = client.chat.completions.create(model="tiny-run", messages=messages, temperature=0, max_tokens=10)
    assert out.choices[0].message.content == content(post(server, ask(images[1], temperature=0, max_tokens=10)))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny-run", messages=messages, temperature=0, max_tokens=10, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == out.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="one choice per request"):
        client.chat.completions.create(model="tiny-run", messages=messages, n=2)


def test_serve_command_starts_a_server(run_dir, images, loaded):
    """`mmbridge serve RUN_DIR --port P` in its own process answers as the model does in this one."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmbridge",
            "serve",
            str(run_dir),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "mmbridge serve did not answer within 120 s"
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.25)
        assert models["data"][0]["id"] == "tiny-run"
        want = reply_alone(loaded, images[3], QUESTION, 8)[1]  # clear of ties: the process's one thread sums otherwise
        assert content(post((f"http://127.0.0.1:{port}",), ask(images[3], temperature=0, max_tokens=8))) == want
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize(
    "text, stop, want",
    [
        ("  漢字 🦩 wörld, fine  ", [], "漢字 🦩 wörld, fine"),
        ("漢字 🦩 wörld, fine", [" wörld"], "漢字 🦩"),
        ("héllo 🦩 wörld, fine", ["🦩", "ll"], "hé"),
        ("héllo 🦩 wörld, fine", ["wörld, fine!"], "héllo 🦩 wörld, fine"),
        ("one\ntwo", ["\n"], "one"),
    ],
)
def test_reply_text_pieces_join_to_the_stripped_cut_reply(tokenizer, text, stop, want):
    """Token by token, the settled pieces never run ahead of the final text (partial stop strings and
    unfinished UTF-8 characters wait) and join to it exactly."""
    from mmbridge.serve.text import ReplyText

    reply = ReplyText(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop)
    pieces = []
    for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
        pieces.append(reply.push(t))
        assert want.startswith("".join(pieces))
        assert "\ufffd" not in "".join(pieces)
    pieces.append(reply.finish())
    assert "".join(pieces) == reply.text == want
    assert reply.stopped == (want != text.strip())  # a stop string was reached
