"""`mmbridge train` in a child process that signals itself at a chosen point, for the kill-and-resume tests: no
polling parent races the run, so the point is the same on every machine.

The point is just before the child's AT_SYNC-th file sync (checkpoint.py's `_fsync`: each file of a checkpoint,
its manifest, its folder, and the folder it is renamed into; so mid-checkpoint too), or as it asks for its
AT_BATCH-th micro-batch. `counted_syncs` records the same syncs of an in-process run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmbridge.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

SIGNALLED = """
import os, signal, sys
from mmbridge.cli import main
from mmbridge.train import checkpoint
from mmbridge.train.trainer import Trainer

sig = getattr(signal, os.environ["SIGNAL"])

def at(count, original):
    calls = [0]
    def wrapped(*args):
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), sig)
        return original(*args)
    return wrapped

if "AT_SYNC" in os.environ:
    checkpoint._fsync = at(int(os.environ["AT_SYNC"]), checkpoint._fsync)
if "AT_BATCH" in os.environ:
    Trainer._next_batch = at(int(os.environ["AT_BATCH"]), Trainer._next_batch)
main(sys.argv[1:])
"""


def start_signalled(recipe_yaml: Path, run_dir: Path, *extra: str, log: Path, **at: str) -> subprocess.Popen:
    """`mmbridge train RECIPE --out RUN EXTRA...`, its output in `log`, signalling itself as `at` says:
    SIGNAL (a name, e.g. "SIGKILL") and AT_SYNC or AT_BATCH (a count from 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **at}
    return subprocess.Popen(
        [sys.executable, "-c", SIGNALLED, "train", str(recipe_yaml), "--out", str(run_dir), *extra],
        cwd=ROOT,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )


@contextlib.contextmanager
def counted_syncs(run_dir: Path):
    """Within: every `_fsync` of this process appended to the yielded list as (file name, step rows that
    RUN/metrics.jsonl held then)."""
    syncs, fsync, metrics = [], ckpt._fsync, Path(run_dir) / "metrics.jsonl"

    def counted(path):
        syncs.append((Path(path).name, metrics.read_text().count("\n") if metrics.exists() else 0))
        fsync(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, "_fsync", counted)
        yield syncs
