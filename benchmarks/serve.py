"""Throughput and latency of `mmbridge serve` over loopback: requests/s and p50/p95 latency at 1, 4 and 8
concurrent clients, each sending greedy image questions (`temperature: 0`) from its own thread.

The server runs in its own process on 127.0.0.1 (a free port) with `--threads` CPU threads; each level
sends `--requests` requests or stops issuing them after `--max-seconds`. The run directory defaults to
`runs/demo-quick`, made first with `mmbridge demo --quick` if it is missing; the questions' images are the
run's `examples/*.png` (or `--images DIR`). The last line is one JSON object.

    python benchmarks/serve.py                      # ~2 min on the 2-core CPU once runs/demo-quick exists
    python benchmarks/serve.py --max-batch 1        # the same with one request decoded at a time
    python benchmarks/serve.py --smoke              # seconds: a 1-step demo run on tiny models, 1 and 2 clients

`--smoke` serves a run it trains first in a temporary folder (the demo recipe on tiny models and a small world built
from configs, one step per stage), asking about the world's test images.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import demo_run_images, tiny_models, tiny_sets, tiny_world, toy_stages  # noqa: E402

SMOKE_KEYS = ("benchmark", "run_dir", "max_batch", "levels")  # what the last JSON line holds (the smoke test)
QUESTIONS = [
    "What is in this picture?",
    "How many shapes are there?",
    "What colour is the largest shape?",
    "Is there a red circle?",
]


def tiny_run(folder: Path) -> tuple[Path, Path]:
    """A demo run on tiny models and a small world, one step per stage (--smoke); its folder and the world's test
    images."""
    from mmbridge.config import load_recipe
    from mmbridge.data.sources import world_manifest
    from mmbridge.train.trainer import Trainer

    world = tiny_world(folder)
    sets = [*tiny_sets(tiny_models(folder), world), *toy_stages("demo", steps=1)]
    run_dir = folder / "run"
    recipe = load_recipe("demo", sets)
    Trainer(recipe, run_dir, progress=False).run()
    return run_dir, world_manifest(recipe.world)[1] / "test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, port: int, threads: int, max_batch: int, timeout: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
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
            "--max-batch",
            str(max_batch),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mmbridge serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"mmbridge serve did not answer within {timeout:.0f} s")
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).raise_for_status()
            return proc
        except httpx.TransportError:
            time.sleep(0.25)


def request_body(image: Path, question: str, max_tokens: int) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
            }
        ],
        "temperature": 0,
        "max_tokens": max_tokens,
    }


def run_level(url: str, bodies: list[dict], clients: int, requests: int, max_seconds: float) -> dict:
    """`clients` threads send requests until `requests` were sent or `max_seconds` passed."""
    counter, lock = itertools.count(), threading.Lock()
    latencies, tokens = [], []
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        with httpx.Client(timeout=max_seconds + 60) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter)
                if i >= requests:
                    return
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/chat/completions", json=bodies[i % len(bodies)])
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens.append(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    cuts = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(cuts[18], 3),
        "completion_tokens_per_s": round(sum(tokens) / wall, 1),
        "mean_completion_tokens": round(sum(tokens) / len(tokens), 1),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/demo-quick")
    parser.add_argument("--images", help="folder of PNG images to ask about (default RUN_DIR/examples)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="stop issuing requests after this, per level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, default=1, help="the server's CPU threads")
    parser.add_argument("--smoke", action="store_true", help="toy sizes (see above)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            run_dir, images = tiny_run(Path(tmp))
            args.run_dir, args.images = str(run_dir), str(images)
            args.clients, args.requests, args.max_tokens, args.max_seconds = [1, 2], 2, 4, 30.0
        return measure(args)


def measure(args) -> dict:
    run_dir = Path(args.run_dir)
    images = demo_run_images(run_dir, args.images, args.threads, timeout=900)
    bodies = [request_body(img, q, args.max_tokens) for img, q in zip(itertools.cycle(images), QUESTIONS * 4)]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(run_dir, port, args.threads, args.max_batch, timeout=300)
    try:
        httpx.post(f"{url}/v1/chat/completions", json=bodies[0], timeout=120).raise_for_status()  # warm-up
        rows = [run_level(url, bodies, c, args.requests, args.max_seconds) for c in args.clients]
    finally:
        server.terminate()
        server.wait(30)

    print(
        f"mmbridge serve {run_dir} (--max-batch {args.max_batch}, {args.threads} thread(s)), "
        f"greedy, max_tokens {args.max_tokens}"
    )
    print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'tok/s':>7} {'tok/req':>7}")
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['requests_per_s']:>7.2f} {r['p50_s']:>7.3f} "
            f"{r['p95_s']:>7.3f} {r['completion_tokens_per_s']:>7.1f} {r['mean_completion_tokens']:>7.1f}"
        )
    result = {
        "benchmark": "serve",
        "smoke": args.smoke,
        "run_dir": str(run_dir),
        "max_batch": args.max_batch,
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "levels": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
