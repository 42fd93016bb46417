"""Benchmark smoke runs: every script in benchmarks/ runs its whole path at toy size.

`python benchmarks/NAME.py --smoke` must exit 0 and print, as its last line, one JSON object holding the keys the
script promises in its module-level `SMOKE_KEYS` (read from the source, so nothing heavy is imported here); a
result with `all_ok` (gpu_check) must have it true. Scripts are found by a glob (names starting with `_` are
helpers), so a new script is covered without editing this file. Each is single-threaded at toy size: two run at a
time, in subprocesses started when the first test asks, in temporary working folders (nothing lands in the repo).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.benchmarks  # select with `-m benchmarks`, leave out with `-m "not benchmarks"`

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
JOBS = 2  # scripts at a time
TIMEOUT_S = 300


def promised_keys(script: Path) -> tuple[str, ...] | None:
    """The script's module-level `SMOKE_KEYS` tuple, or None if it declares none."""
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SMOKE_KEYS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    return None


def run_smoke(script: Path, folder: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MMBRIDGE_INDEX_CACHE": str(folder / "index-cache"),
    }
    try:
        return subprocess.run(
            [sys.executable, str(script), "--smoke"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(
            e.cmd, -1, e.stdout or "", f"{e.stderr or ''}\ntimed out after {TIMEOUT_S} s"
        )


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory, smollm_dir):
    """{script stem: future of its run}, for the scripts this session selected. `smollm_dir` first: the SmolLM2
    tokenizer is dequantised once, not by two scripts at the same time."""
    chosen = {
        item.callspec.params["script"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    pool = ThreadPoolExecutor(JOBS)
    yield {s.stem: pool.submit(run_smoke, s, tmp_path_factory.mktemp(s.stem)) for s in SCRIPTS if s in chosen}
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_runs_at_toy_size(script: Path, smoke_runs):
    keys = promised_keys(script)
    assert keys, f"{script.name}: declare SMOKE_KEYS, the keys of the JSON object its last line prints"
    proc = smoke_runs[script.stem].result()
    log = f"--- stdout (end)\n{proc.stdout[-2000:]}\n--- stderr (end)\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"{script.name} --smoke exited {proc.returncode}\n{log}"
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(f"{script.name} --smoke: the last line is not one JSON object\n{log}")
    assert isinstance(result, dict), f"{script.name} --smoke: the last line is JSON but not an object"
    missing = [k for k in keys if k not in result]
    assert not missing, f"{script.name} --smoke: the JSON lacks promised keys {missing}; it has {sorted(result)}"
    if "all_ok" in result:
        failed = {k: v for k, v in result.get("checks", {}).items() if v.get("ok") is False}
        assert result["all_ok"] is True, f"{script.name} --smoke: all_ok is {result['all_ok']}; failed: {failed}"
