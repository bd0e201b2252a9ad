"""bench/nf4.py's table and target lines on the CPU, from synthetic rows: the reference rows (same-bytes copy,
write-only, one-element launch) count their own bytes and say when a target's time is below the write alone."""
from bench.nf4 import COPY, EMPTY, WRITE, _summary, _table, deq_bytes

import torch


def _row(shape, provider, us, kus):
    return {"op": "nf4_dequant", "shape": list(shape), "dtype": "bf16", "provider": provider, "us": us, "kus": kus,
            "peak": 0.0}


def test_reference_rows_and_target_lines():
    copy_gbs = 4000.0
    big, small = (14336, 4096), (1024, 4096)
    t95 = deq_bytes(big, torch.bfloat16) / (0.95 * copy_gbs) / 1e3
    rows = [_row(big, "ours triton", 42.0, 38.5), _row(big, COPY, 42.2, 40.0), _row(big, WRITE, t95 - 0.6, t95 + 1.0),
            _row(small, "ours cuda", 8.0, 4.8), _row(small, WRITE, 6.5, 3.0), _row(small, EMPTY, 3.1, 1.2)]
    table = _table(rows, copy_gbs)
    wr = next(line for line in table.splitlines() if WRITE in line and "14336x4096" in line)
    gbs = 14336 * 4096 * 2 / (t95 - 0.6) / 1e3  # the output's bytes only
    assert f"| {gbs:.0f} |" in wr, wr
    lines = _summary(rows, copy_gbs, {}).splitlines()
    big_line = next(line for line in lines if line.startswith("- dequant 14336x4096 bf16"))
    assert f"writing the output alone (no reads): eager {t95 - 0.6:.1f} µs" in big_line
    assert f"shorter / longer than the {t95:.1f} µs of 95% of copy" in big_line and "out of reach" not in big_line
    rows[2] = _row(big, WRITE, t95 + 0.5, t95 + 1.0)  # both methods longer: no kernel writing this output gets there
    assert "out of reach" in next(l for l in _summary(rows, copy_gbs, {}).splitlines() if l.startswith("- dequant 14336x4096 bf16"))
    small_line = next(line for line in lines if line.startswith("- dequant 1024x4096 bf16"))
    assert "one-element launch timed the same ways: eager 3.1 µs, GPU-only 1.2 µs" in small_line


def test_reference_rows_without_gpu_only_time():
    # a reference row whose profiler timing failed ('kus' missing): its eager time still said, no made-up 0.0 µs
    # and no out-of-reach claim from one method
    copy_gbs = 4000.0
    big, small = (14336, 4096), (1024, 4096)
    t95 = deq_bytes(big, torch.bfloat16) / (0.95 * copy_gbs) / 1e3
    rows = [_row(big, "ours triton", 42.0, 38.5), _row(big, WRITE, t95 + 2.0, None),
            _row(small, "ours cuda", 8.0, 4.8), _row(small, EMPTY, 3.1, None)]
    for r in rows:
        if r["kus"] is None:
            del r["kus"]
    lines = _summary(rows, copy_gbs, {}).splitlines()
    big_line = next(line for line in lines if line.startswith("- dequant 14336x4096 bf16"))
    assert f"writing the output alone (no reads): eager {t95 + 2.0:.1f} µs" in big_line and "out of reach" not in big_line
    small_line = next(line for line in lines if line.startswith("- dequant 1024x4096 bf16"))
    assert "one-element launch timed the same ways: eager 3.1 µs" in small_line and "0.0 µs" not in small_line


def test_a_provider_failing_after_its_eager_time_keeps_the_row(monkeypatch, capsys):
    import bench.nf4 as nf4

    monkeypatch.setattr(nf4, "_time_peak", lambda fn: (12.5, 0.0))

    def broken(fn):
        raise RuntimeError("profiler unavailable")

    monkeypatch.setattr(nf4, "kernel_us", broken)
    monkeypatch.setattr(nf4.torch.cuda, "empty_cache", lambda: None)
    rows = []
    nf4._run_provider(rows, {"op": "nf4_dequant", "shape": [2, 64], "dtype": "bf16"}, "ours triton", lambda: (lambda: None))
    assert rows[0]["us"] == 12.5 and "kus" not in rows[0] and "profiler unavailable" in rows[0]["error"]
    out = capsys.readouterr().out
    assert "12.5 us eager" in out and "profiler unavailable" in out
