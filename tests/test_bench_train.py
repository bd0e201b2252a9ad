"""bench/train.py on the CPU: the whole GPU code path (checkpoint writer, one process per row, the ours and
transformers+peft rows, the profiler table, the row cache, the results table) at a tiny model shape, so the
8B run on the GPU cannot fail on a typo; and the longest-sequence search against simulated memory limits."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.train import (ROWS, checkpoint_complete, idle_gaps, kernel_kind, checkpoint_tensors, flops_per_token, model_config, next_probe,
                         render, upsert)

ROOT = Path(__file__).resolve().parent.parent

# Simulated peak memory (GiB) of one batch-1 step at T tokens, with the card's total; each with its reason.
MEMORY_MODELS = [
    ("linear, limit near 296k (flash attention: memory linear in T)", lambda T: 6 + 2.5e-4 * T),
    ("super-linear: the linear fit overshoots, bisection must still converge",
     lambda T: 6 + 1.5e-4 * T + 3e-10 * T * T),
    ("nothing fits: even the lower bound fails", lambda T: 90 + 1e-6 * T),
    ("everything fits: the upper bound passes", lambda T: 6 + 1e-6 * T),
]


def _bench(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PEERS_UNSLOTH", None)
    p = subprocess.run([sys.executable, "-m", "bench.train", "--tiny", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (f"bench.train {' '.join(args)} exited {p.returncode}:\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


@pytest.mark.usefixtures("one_thread")
def test_tiny_run_through_the_gpu_code_path(tmp_path):
    ckpt, cache = tmp_path / "ckpt", tmp_path / "rows.json"
    # Rows of an earlier invocation: one another row (kept and shown), one this run measures again (replaced).
    earlier = {"ok": True, "tok_s": 123.0, "step_ms": 520.3, "step_ms_all": [520.3], "loss_first": 5.5,
               "loss_last": 5.4, "load_s": 1.0}
    seed = [{"kind": "row", "model": "tiny-L1", "row": r, "seq": 32, "batch": 2, "flops_per_token": 1.0,
             "result": dict(earlier)} for r in ("ours-16bit", "ours")]
    cache.write_text(json.dumps(seed))
    out = _bench("--rows", "ours,peft-bnb,unsloth", "--profile", "--ckpt-dir", str(ckpt), "--cache", str(cache),
                 "--no-write")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg == model_config(True, 1)
    wm = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    want = {name for _, group in checkpoint_tensors(cfg) for name, _, _ in group}
    assert set(wm) == want and all((ckpt / f).is_file() for f in set(wm.values())), sorted(set(wm) ^ want)
    assert "written in" in out and checkpoint_complete(ckpt, cfg)  # the next invocation skips writing
    assert not checkpoint_complete(ckpt, model_config(True, 2))  # another shape is written anew

    records = json.loads(cache.read_text())
    rows = {r["row"]: r for r in records if r["kind"] == "row"}
    assert sorted(rows) == ["ours", "ours-16bit", "peft-bnb", "unsloth"], sorted(rows)
    assert len([r for r in records if r["kind"] == "row"]) == 4
    assert rows["ours-16bit"]["result"]["tok_s"] == 123.0 and rows["ours"]["result"]["tok_s"] != 123.0
    for name in ("ours", "peft-bnb"):
        res = rows[name]["result"]
        assert res["ok"], f"{name}: {res.get('error')}"
        assert len(res["step_ms_all"]) == 2 and all(ms > 0 for ms in res["step_ms_all"]), res["step_ms_all"]
        assert res["tok_s"] == pytest.approx(2 * 32 / (res["step_ms"] / 1e3))
        assert len(res["losses"]) == 3 and all(math.isfinite(x) for x in res["losses"]), res["losses"]
        # random ids over a vocabulary of 256: the untrained model's loss is near ln(256)
        assert abs(res["losses"][0] - math.log(256)) < 0.5, res["losses"]
    # The same workload in both frameworks: LoRA B starts at zero, so the first step's loss is the base model's,
    # with the same NF4 weights (our quantizer writes bitsandbytes' bytes) computed in fp32 on the CPU.
    l_ours, l_peft = rows["ours"]["result"]["losses"][0], rows["peft-bnb"]["result"]["losses"][0]
    assert abs(l_ours - l_peft) < 1e-4, f"first-step loss: ours {l_ours} vs peft {l_peft}"
    assert not rows["unsloth"]["result"]["ok"] and rows["unsloth"]["result"]["error"]

    prof = [r for r in records if r["kind"] == "profile"]
    assert len(prof) == 1 and prof[0]["row"] == "ours" and len(prof[0]["result"]["profile"]["kernels"]) > 5
    host = prof[0]["result"]["profile"]["host_ops"]
    assert len(host) > 5 and all(h["us_per_call"] >= 0 and h["calls"] >= 1 for h in host)
    assert host == sorted(host, key=lambda h: h["ms"], reverse=True)
    assert "| ours | nf4 | 32 | 2 |" in out and "| peft-bnb | nf4 | 32 | 2 |" in out, out[-3000:]
    assert "| ours-16bit | bf16 | 32 | 2 | 123 | 520.3 |" in out, out[-3000:]
    assert "## Profile: ours tiny-L1 T=32" in out


@pytest.mark.parametrize("why,peak", MEMORY_MODELS, ids=[m[0].split(":")[0] for m in MEMORY_MODELS])
def test_longest_search_finds_the_limit(why, peak):
    total, lo_bound, hi_bound, step = 80.0, 1024, 524288, 1024
    probes, order = {}, []
    while (T := next_probe(probes, lo_bound, hi_bound, step, 32768)) is not None:
        assert T not in probes and T % step == 0 and lo_bound <= T <= hi_bound, (T, order)
        m = peak(T)
        probes[T] = {"ok": m <= total, "peak_reserved_gib": m if m <= total else None, "total_gib": total}
        order.append(T)
        assert len(order) <= 14, f"{why}: too many probes {order}"
    fits = [T for T in range(step, hi_bound + 1, step) if peak(T) <= total]
    truth = max(fits, default=None)
    found = max((T for T, p in probes.items() if p["ok"]), default=None)
    assert found == truth, f"{why}: found {found}, expected {truth}, probes {order}"


def test_rows_and_flops():
    assert {"ours", "ours-16bit", "peft-bnb", "peft-bnb-liger", "peft-16bit", "unsloth", "unsloth-16bit"} <= set(ROWS)
    # issue 9: about 32 GFLOP per token for the 8B step at T=2048 without recomputation
    assert flops_per_token(model_config(False, 32), 2048) == pytest.approx(31.6e9, rel=0.02)


def test_profile_kernel_kinds():
    # names as torch.profiler reports them on an H100/H200 (cuBLAS, cuDNN attention, our Triton/CUDA kernels)
    assert kernel_kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "gemm (cuBLAS)"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attention"
    assert kernel_kind("nf4_dequant_bf16_u1") == "nf4 dequantize / matmul"
    assert kernel_kind("_rms_norm_bwd_kernel") == "rms_norm" and kernel_kind("_swiglu_kernel") == "swiglu"
    assert kernel_kind("Memcpy DtoH (Device -> Pinned)") == "memcpy"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<8, CUDAFunctor_add>") == \
        "elementwise / copy (torch)"
    assert kernel_kind("some_new_kernel") == "other"


def test_profile_idle_gaps():
    # kernels on two streams overlap; copies and host events do not count as busy; holes are summed by neighbours
    from types import SimpleNamespace as N

    def ev(name, s, e, dev="DeviceType.CUDA"):
        return N(name=name, device_type=dev, time_range=N(start=s, end=e))

    evs = [ev("gemm", 0, 10), ev("Memcpy DtoH (Device -> Pinned)", 10, 48), ev("rope", 12, 20), ev("attn", 15, 30),
           ev("norm", 40, 41), ev("step", 0, 100, "DeviceType.CPU"), ev("gemm", 50, 60), ev("norm", 65, 70),
           ev("gemm", 80, 90), ev("norm", 95, 96)]
    g = idle_gaps(evs, steps=2)
    assert g["idle_ms"] == pytest.approx((2 + 10 + 9 + 5 + 10 + 5) / 1e3 / 2)
    top = g["holes"][0]
    assert (top["after"], top["before"], top["count"]) == ("norm", "gemm", 2) and top["ms"] == pytest.approx((9 + 10) / 1e3 / 2)
    # the hole 41 -> 50 ends 2 µs after the copy (10 -> 48): a wait on that copy; no other hole is
    assert g["copy_wait_ms"] == pytest.approx(9 / 1e3 / 2)
    assert idle_gaps([], 1) == {"idle_ms": 0.0, "copy_wait_ms": 0.0, "holes": []}


@pytest.mark.gpu
def test_gpu_preflight_one_layer(tmp_path):
    """The GPU path at the full 8B width with one layer (a minute): checkpoint on the GPU, our NF4 row with the
    profiler, the transformers + peft + bitsandbytes row; run before the long `python -m bench.train` calls."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PEERS_UNSLOTH", None)
    cache = tmp_path / "rows.json"
    # the peer row needs transformers + peft + bitsandbytes (on the GPU machine: ../shared/PEERS.md's wheels)
    peer = all(importlib.util.find_spec(m) is not None for m in ("bitsandbytes", "peft", "transformers"))
    # ours-offload-graph-7g: keep_mlp_layers="auto" calibrating in the bench loop (CUDA only), within 7 GiB
    names = ("ours", "ours-offload-graph-7g") + (("peft-bnb",) if peer else ())
    p = subprocess.run([sys.executable, "-m", "bench.train", "--layers", "1", "--rows", ",".join(names), "--seq", "512",
                        "--warmup", "2", "--steps", "3", "--profile", "--ckpt-dir", str(tmp_path / "ckpt"),
                        "--cache", str(cache), "--no-write", "--budget-s", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    records = json.loads(cache.read_text())
    rows = {r["row"]: r["result"] for r in records if r["kind"] == "row"}
    for name in names:
        res = rows[name]
        assert res.get("ok"), f"{name}: {res.get('error')}\n{p.stdout[-4000:]}"
        assert res["peak_alloc_gib"] > 0 and res["peak_reserved_gib"] >= res["peak_alloc_gib"]
        assert all(math.isfinite(x) for x in res["losses"]), res["losses"]
        print(f"\n{name}: {res['tok_s']:,.0f} tok/s, peak {res['peak_alloc_gib']:.2f} GiB, losses {res['losses']}")
    # same NF4 bytes, same ids, adapters start at zero: the first losses agree up to bf16 rounding
    if peer:
        assert abs(rows["ours"]["losses"][0] - rows["peft-bnb"]["losses"][0]) < 0.05, (rows["ours"]["losses"],
                                                                                        rows["peft-bnb"]["losses"])
    prof = [r["result"]["profile"] for r in records if r["kind"] == "profile"]
    assert prof and prof[0]["timed"] == "cuda" and prof[0]["kernels"] and prof[0]["gpu_busy_ms"] > 0, prof
    if not peer:  # said, not silently passed: the oracle comparison did not run
        pytest.skip("our row checked; the peft-bnb row and its first-loss comparison need bitsandbytes, peft and "
                    "transformers (../shared/PEERS.md's wheels on the GPU machine)")


def test_longest_table_keeps_capped_and_whole_card_searches_apart():
    """A search under --longest-cap-gib is cached and shown apart from the uncapped one of the same row."""
    records = []
    probe = lambda ok, peak: {"ok": ok, "why": "ok" if ok else "oom", "peak_reserved_gib": peak, "total_gib": 24}  # noqa: E731
    for cap, probes in ((None, {"65536": probe(True, 70.0), "131072": probe(False, None)}),
                        (24.0, {"32768": probe(True, 20.5), "40960": probe(True, 23.1), "43008": probe(False, None)})):
        key = {"kind": "longest", "model": "m", "row": "ours-offload", "seq": 0, "batch": 1, "cap_gib": cap}
        upsert(records, {**key, "probes": probes, "done": cap is not None, "result": {"versions": {}}},
               keys=tuple(key))
    assert len(records) == 2
    (title, table), = [s for s in render(records, None) if s[0].startswith("Longest")]
    lines = [l for l in table.splitlines() if l.startswith("| m |")]
    assert len(lines) == 2, table
    assert "capped at 24 GiB" in lines[0] and "| 40,960 | 43,008 |" in lines[0], table
    assert "whole card" in lines[1] and "| 65,536 | 131,072 |" in lines[1], table


def test_results_tables_well_formed():
    # every markdown table in bench/results: a header, a separator of as many columns, rows of as many columns
    # (a row pasted into the separator line renders the whole table as text)
    for path in sorted((ROOT / "bench" / "results").glob("*.md")):
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("|"):
                i += 1
                continue
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            table = lines[i:j]
            cols = table[0].rstrip().rstrip("|").count("|")
            where = f"{path.name}:{i + 1}"
            assert len(table) >= 2 and set(table[1].replace("|", "").strip()) <= set("-: "), where
            assert table[1].strip().count("|") - 1 == cols, where
            for k, row in enumerate(table[2:], i + 3):
                assert row.rstrip().rstrip("|").replace("\\|", "").count("|") == cols, f"{path.name}:{k}"
            i = j
