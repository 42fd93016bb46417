"""Indexing in forked workers while a training run's signal handlers are installed does not hang."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_index_workers_stop_under_a_training_runs_sigterm_handler(tmp_path, smollm_dir):
    # a run installs a SIGTERM handler that only asks for a checkpoint; the index pool stops its workers with
    # SIGTERM when it closes, so workers that kept that handler would never exit (seen at a stage's start)
    code = textwrap.dedent(f"""
        import json, signal, sys
        from transformers import AutoTokenizer
        from mmbridge.data.processor import Processor
        from mmbridge.data.record_file import RecordFile
        from mmbridge.data.record_index import build_index

        import mmbridge.data.record_index as ri

        def probe(span, _job=ri._job):  # in each worker: what SIGTERM does there
            with open({str(tmp_path / "dispositions")!r}, "a") as f:
                f.write(str(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL) + chr(10))
            return _job(span)

        ri._job = probe
        signal.signal(signal.SIGTERM, lambda *a: None)
        recs = [{{"id": str(i), "conversations": [{{"from": "human", "value": "hello number %d" % i}},
                                                   {{"from": "gpt", "value": "fine"}}]}} for i in range(4500)]
        path = {str(tmp_path / "data.json")!r}
        json.dump(recs, open(path, "w"))
        tok = AutoTokenizer.from_pretrained({smollm_dir!r})
        proc = Processor(tok, 4, 32, (0, 0, 0), (1, 1, 1), max_length=64, system_prompt="")
        store = RecordFile(path)
        store.locate()
        index = build_index(store, proc, workers=2)
        print(len(index["rows"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "4500"
    # SIGTERM, which the pool stops its workers with, kills them whatever handler the run installed; the hang
    # itself depends on a race between the pool's sentinels and its terminate, so it is checked this way
    assert (tmp_path / "dispositions").read_text().split() == ["True", "True"]
