"""bench/nf4.py's table and target lines on the CPU, from synthetic rows: the reference rows (same-bytes copy,
write-only, one-element launch) count their own bytes and say when a target's time is below the write alone; the
matmul's eager-loop column (ring size, loop timing with fake events) and the target lines judging eager choices by it
and graph choices by GPU-only time."""
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


# ---- the matmul table's eager-loop column (a decode-like ring of distinct weights) ------------------------------

def test_ring_size_exceeds_twice_l2_and_is_capped():
    from bench.nf4 import RING_CAP, nf4_bytes, ring_size

    l2 = 50 * 2**20
    for shape, want in (((4096, 4096), 13), ((1024, 4096), 49), ((14336, 4096), 4), ((4096, 14336), 4)):
        n = ring_size(shape, l2)
        assert n == want, (shape, n)
        assert n * nf4_bytes(shape) > 2 * l2 >= (n - 1) * nf4_bytes(shape), shape  # the fewest that overflow L2 twice
    assert ring_size((64, 64), l2) == RING_CAP == 64
    assert ring_size((128256, 4096), l2) == 1


def test_ring_reuses_the_cached_weight_and_is_shared(monkeypatch):
    import bench.nf4 as nf4

    made = []
    monkeypatch.setattr(nf4, "_quantize", lambda shape: made.append(shape) or (f"q{len(made)}", None, None))
    monkeypatch.setattr(nf4.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(nf4, "_QCACHE", {})
    monkeypatch.setattr(nf4, "ring_size", lambda shape, l2=None: 3)
    first = nf4._quantized_cache((8, 64))
    ring = nf4._ring((8, 64))
    assert ring[0] is first and len(ring) == 3 and len(made) == 3
    assert nf4._ring((8, 64)) is ring and len(made) == 3  # the next provider of the shape gets the same ring
    nf4._quantized_cache((16, 64))  # a new shape frees the old weight and its ring
    assert all(k == (16, 64) for k in nf4._QCACHE)


class _FakeEvent:
    """torch.cuda.Event stand-in: record() notes how many calls had run; elapsed_time is 1 ms per call between."""
    log: list = []

    def __init__(self, enable_timing=False):
        self.at = None

    def record(self):
        self.at = len(_FakeEvent.log)

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        calls = _FakeEvent.log[self.at:end.at]
        return float(sum(calls))  # each call logs its own "ms"


def test_loop_us_warms_up_once_then_times_passes_over_the_ring(monkeypatch):
    import bench.nf4 as nf4

    _FakeEvent.log = []
    syncs = []
    monkeypatch.setattr(nf4.torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(nf4.torch.cuda, "synchronize", lambda: syncs.append(len(_FakeEvent.log)))
    costs = iter([0.0] * 3 + [0.003] * 6 + [0.009] * 6 + [0.006] * 6 + [0.006] * 6 + [0.030] * 6)
    ring = [lambda: _FakeEvent.log.append(next(costs)) for _ in range(3)]
    us = nf4.loop_us(ring, passes=2, samples=5)
    assert len(_FakeEvent.log) == 3 + 5 * 2 * 3  # one warm-up pass, then 5 samples of 2 passes
    assert syncs[0] == 3  # synchronized after the warm-up pass, before the first window
    assert abs(us - 6.0) < 1e-9, us  # median of 3, 9, 6, 6, 30 µs per call


def test_run_provider_times_the_ring(monkeypatch, capsys):
    import bench.nf4 as nf4

    monkeypatch.setattr(nf4, "_time_peak", lambda fn: (12.5, 0.0))
    monkeypatch.setattr(nf4, "kernel_us", lambda fn: 7.0)
    monkeypatch.setattr(nf4, "loop_us", lambda fns: 20.0 + len(fns))
    monkeypatch.setattr(nf4.torch.cuda, "empty_cache", lambda: None)
    rows = []
    key = {"op": "nf4_matmul", "shape": [8, 64, 64], "dtype": "bf16"}
    nf4._run_provider(rows, key, "ours auto", lambda: (lambda: None), ring=lambda: [lambda: None] * 4)
    assert rows[0]["us"] == 12.5 and rows[0]["loop_us"] == 24.0 and rows[0]["kus"] == 7.0
    assert "24.0 us eager loop" in capsys.readouterr().out
    nf4._run_provider(rows, key, "ours auto", lambda: (lambda: None))  # no ring (dequant rows): no loop time
    assert "loop_us" not in rows[1]


def _mm(m, shape, provider, us, loop, kus):
    return {"op": "nf4_matmul", "shape": [m, *shape], "dtype": "bf16", "provider": provider, "us": us,
            "loop_us": loop, "kus": kus, "peak": 0.0}


def _mm_rows(mma_loop, deq_loop, mma_kus, deq_kus):
    s = (4096, 4096)
    # the 1-call (L2 flushed) column says the opposite of the loop column for the eager judgement
    return [_mm(32, s, "ours mma cuda", 30.0, mma_loop, mma_kus), _mm(32, s, "ours dequant+cuBLAS", 24.0, deq_loop, deq_kus),
            _mm(32, s, "ours auto", 31.0, 38.2, 20.5), _mm(32, s, "dequant + F.linear", 25.4, 50.0, 23.0),
            _mm(32, s, "bitsandbytes matmul_4bit", 40.0, 60.0, 35.0)]


def test_summary_judges_eager_by_the_loop_column_and_graph_by_gpu_only():
    picks = {(32, 4096, 4096): "mma_cuda", ("graph", 32, 4096, 4096): "dequant"}
    line = next(l for l in _summary(_mm_rows(37.9, 47.0, 20.0, 22.0), 4000.0, picks).splitlines()
                if l.startswith("- matmul M=32 4096x4096"))
    assert "eager: picked mma_cuda 37.9 µs (eager loop) vs best other ours dequant+cuBLAS 47.0 µs (wins)" in line, line
    assert "graph: picked dequant 22.0 µs (GPU-only) vs best other ours mma cuda 20.0 µs (LOSES)" in line, line
    assert "ours auto eager loop 38.2 µs (1 call, L2 flushed 31.0; GPU-only 20.5)" in line, line
    assert "dequant + F.linear eager loop 50.0 µs (ours 1.31x its speed)" in line, line
    assert "bnb matmul_4bit eager loop 60.0 µs (GPU-only 35.0; ours 1.57x its speed)" in line, line
    assert "vs best peer 1.31x (eager loop)" in line, line
    line = next(l for l in _summary(_mm_rows(47.0, 37.9, 22.0, 20.0), 4000.0, picks).splitlines()
                if l.startswith("- matmul M=32 4096x4096"))
    assert "eager: picked mma_cuda 47.0 µs (eager loop) vs best other ours dequant+cuBLAS 37.9 µs (LOSES)" in line, line
    assert "graph: picked dequant 20.0 µs (GPU-only) vs best other ours mma cuda 22.0 µs (wins)" in line, line


def test_matmul_table_has_the_three_time_columns():
    table = _table(_mm_rows(37.9, 47.0, 20.0, 22.0), 4000.0)
    head, sep, *body = table.splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert "µs (1 call, L2 flushed)" in cols and "eager loop µs" in cols and "GPU-only µs" in cols
    assert "µs" not in cols
    assert sep.count("|") == head.count("|") and all(r.count("|") == head.count("|") for r in body)
    auto = next(r for r in body if "ours auto" in r).split("|")
    assert auto[cols.index("eager loop µs") + 1].strip() == "38.2"
    assert auto[cols.index("vs best peer") + 1].strip() == f"{50.0 / 38.2:.2f}x"  # by the loop column


def test_write_row_timed_with_torch_fill_claims_no_ceiling():
    # torch's fill_ writes slower than a plain 16-byte-store kernel (H200: 36.2 vs 26.8 µs for 117 MB): a write-only
    # row timed with it (no CuPy for bench/dev's fill) says so and never concludes that 95% is out of reach
    copy_gbs = 4000.0
    big = (14336, 4096)
    t95 = deq_bytes(big, torch.bfloat16) / (0.95 * copy_gbs) / 1e3
    rows = [_row(big, "ours triton", 42.0, 38.5), dict(_row(big, WRITE, t95 + 0.5, t95 + 1.0), fill="torch fill_")]
    line = next(l for l in _summary(rows, copy_gbs, {}).splitlines() if l.startswith("- dequant 14336x4096 bf16"))
    assert "out of reach" not in line and "timed with torch fill_, which is no write ceiling" in line, line
