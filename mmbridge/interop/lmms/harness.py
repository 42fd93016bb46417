"""lmms-eval on a run both ways, as processes: `mmbridge serve` with lmms-eval's `openai` model, and lmms-eval's
`mmbridge` model (the plugin); then each question's answer and the score read back from lmms-eval's output. Used by
tests/test_lmms_eval.py and benchmarks/lmms_eval_agreement.py."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from mmbridge.interop.lmms.task import METRIC

ENTRY_GROUP = "lmms_eval.models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def declared_entry_points(pyproject: str | Path) -> dict[str, str]:
    """pyproject.toml's `[project.entry-points."lmms_eval.models"]` table: {name: "module:attr"}."""
    text = Path(pyproject).read_text()
    head = f'[project.entry-points."{ENTRY_GROUP}"]'
    if head not in text:
        return {}
    body = text.split(head, 1)[1].split("\n[", 1)[0]
    found = re.findall(r'^\s*([\w.-]+)\s*=\s*"([^"]+)"', body, flags=re.M)
    return dict(found)


def entry_point_dir(folder: str | Path, entry_points: dict[str, str]) -> Path:
    """`folder` holding a minimal `*.dist-info` that declares `entry_points` in lmms-eval's group: on PYTHONPATH, it
    registers mmbridge with lmms-eval where mmbridge runs from a source tree whose installed metadata predates the
    entry point (`pip install -e .` writes the real one)."""
    info = Path(folder) / "mmbridge_lmms_entry_points-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmbridge-lmms-entry-points\nVersion: 0\n")
    lines = [f"[{ENTRY_GROUP}]", *(f"{k} = {v}" for k, v in entry_points.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    return Path(folder)


@contextmanager
def served(run_dir: str | Path, api_key: str, env: dict, log: str | Path, device: str = "cpu", timeout: float = 180):
    """`mmbridge serve RUN_DIR` on a free loopback port with `api_key` (from the environment, as MMBRIDGE_API_KEY),
    its output in `log`; yields its base URL (`.../v1`) once `GET /v1/models` answers, and stops it after."""
    import httpx

    port = free_port()
    argv = [sys.executable, "-m", "mmbridge", "serve", str(run_dir), "--port", str(port), "--device", device]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*argv, "--log-level", "warning"],
            env={**env, "MMBRIDGE_API_KEY": api_key},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mmbridge serve exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mmbridge serve did not answer within {timeout:.0f} s:\n{Path(log).read_text()}")
            try:
                httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=2).raise_for_status()
                break
            except httpx.TransportError:
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def lmms_eval_argv(model: str, model_args: str, include_path: str | Path, task: str, out_dir: str | Path, **flags):
    """`python -m lmms_eval eval` on one local task, its samples logged under `out_dir`; `flags`: more options
    (`batch_size=16` → `--batch_size 16`, `force_simple=True` → `--force_simple`)."""
    argv = [sys.executable, "-m", "lmms_eval", "eval", "--model", model, "--model_args", model_args]
    argv += ["--tasks", task, "--include_path", str(include_path), "--log_samples", "--output_path", str(out_dir)]
    for k, v in flags.items():
        argv += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return argv


def start_lmms_eval(argv: list[str], env: dict, log: str | Path, cwd: str | Path) -> subprocess.Popen:
    """lmms-eval in its own process (output to `log`), started in `cwd` (it reads a `.env` file there)."""
    with open(log, "w") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)


def finish(proc: subprocess.Popen, log: str | Path, timeout: float) -> None:
    """Wait for `proc`; RuntimeError with the end of its log if it fails or runs past `timeout` seconds."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{proc.args[:5]} ran past {timeout:.0f} s:\n{Path(log).read_text()[-3000:]}") from None
    if code != 0:
        raise RuntimeError(f"{proc.args[:5]} exited with {code}:\n{Path(log).read_text()[-3000:]}")


def finish_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float) -> dict[str, float]:
    """Wait for every process (as `finish`); {name: seconds until it ended}, counted from this call."""
    start, took = time.monotonic(), {}
    while len(took) < len(procs):
        for name, proc in procs.items():
            if name not in took and (proc.poll() is not None or time.monotonic() - start > timeout):
                finish(proc, logs[name], 0.1)
                took[name] = round(time.monotonic() - start, 1)
        time.sleep(0.1)
    return took


def read_output(out_dir: str | Path, task: str) -> tuple[float, dict[int, str], dict[int, dict]]:
    """lmms-eval's results under `out_dir`: (the task's score, {doc_id: answer}, {doc_id: logged sample})."""
    out = Path(out_dir)
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob(f"*_samples_{task}.jsonl"))
    if not results or not samples:
        raise RuntimeError(f"{out}: no lmms-eval results and samples for task {task!r} (was --log_samples given?)")
    score = json.loads(results[-1].read_text())["results"][task][f"{METRIC},none"]
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    by_doc = {r["doc_id"]: r for r in rows}
    return float(score), {d: _answer(r) for d, r in by_doc.items()}, by_doc


def _answer(sample: dict) -> str:
    got = sample["filtered_resps"]
    while isinstance(got, list):  # one filter, one answer: some versions nest it
        got = got[0]
    return got


def base_env(extra_path: list[str | Path] = ()) -> dict:
    """The environment for the processes: offline, one thread each, `extra_path` before PYTHONPATH."""
    path = [str(p) for p in extra_path] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
