"""bench/trainer.py on the CPU: the Trainer rows (a fresh process each, the checkpoint writer, the table) at a
tiny shape, so the GPU run cannot fail on a typo; both rows train the same steps on the same data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.trainer import make_examples

ROOT = Path(__file__).resolve().parent.parent


def test_examples_follow_the_length_law():
    ex = make_examples(500, median=300, max_len=1024, vocab=1000)
    lens = sorted(len(e["input_ids"]) for e in ex)
    assert 32 <= lens[0] and lens[-1] <= 1024 and 200 < lens[250] < 450
    assert all(e["labels"][: len(e["input_ids"]) // 3] == [-100] * (len(e["input_ids"]) // 3) for e in ex)
    assert make_examples(5, 300, 1024, 1000) == make_examples(5, 300, 1024, 1000)


@pytest.mark.usefixtures("one_thread")
def test_tiny_trainer_rows(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "bench.trainer", "--tiny", "--ckpt-dir", str(tmp_path / "ck"),
                        "--no-write", "--rows", "eager,graphs,graphs-on"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["row"]: r for r in (json.loads(l) for l in p.stdout.splitlines() if l.startswith("{"))}
    assert sorted(rows) == ["eager", "graphs", "graphs-on"] and all(r["ok"] for r in rows.values()), rows
    assert (rows["graphs"]["gc"], rows["graphs-on"]["gc"]) == ("off", "on")  # "auto" is off on the CPU
    assert rows["eager"]["loss_first"] == rows["graphs"]["loss_first"]  # CPU: both eager, the same run
    assert rows["graphs"]["off_because"] and rows["eager"]["graphs"] == 0
    assert 0 <= rows["eager"]["pad_fraction"] < rows["eager"]["graph_pad_fraction"] < 1
    assert "| eager |" in p.stdout and "| graphs |" in p.stdout
