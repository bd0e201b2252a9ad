"""Hardware ceilings measured on the card in the same run, and the results-table convention.

Every benchmark compares its numbers to what this card actually does, not to a datasheet:
  * copy bandwidth: a device-to-device copy of a buffer much larger than L2 (read + write bytes / time);
  * bf16 matmul rate: cuBLAS on an 8192^3 GEMM (2*M*N*K flops / time).
Results go to ``bench/results/<date>-<card>-<what>.md`` with the card, driver and library versions.

Run alone: ``python -m bench.hw`` prints both ceilings.
"""
from __future__ import annotations

import datetime
import functools
import platform
import re
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def bench_us(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median microseconds of ``fn()`` timed with CUDA events (triton's do_bench, which also flushes L2)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs(nbytes: int = 2 * 2**30) -> float:
    """Device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = bench_us(lambda: dst.copy_(src), warmup=5, rep=40)
    return 2 * nbytes / us / 1e3


@functools.lru_cache(maxsize=None)
def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul rate in TFLOP/s for an n^3 GEMM of ``dtype`` through cuBLAS."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    us = bench_us(lambda: a @ b, warmup=5, rep=30)
    return 2 * n**3 / us / 1e6


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def card_slug() -> str:
    name = card_name().lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def environment() -> dict[str, str]:
    """Card, driver and versions, for the header of every results table."""
    env = {"date": datetime.date.today().isoformat(), "card": card_name(), "torch": torch.__version__,
           "cuda": str(torch.version.cuda), "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["memory"] = f"{props.total_memory / 2**30:.0f} GiB"
        env["sm count"] = str(props.multi_processor_count)
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - a missing nvidia-smi only loses one header line
            env["driver"] = "unknown"
    from importlib import metadata

    for mod, dist in (("triton", "triton"), ("cupy", "cupy-cuda13x"), ("bitsandbytes", "bitsandbytes"),
                      ("liger_kernel", "liger-kernel"), ("unsloth", "unsloth"), ("transformers", "transformers"),
                      ("peft", "peft")):
        try:
            m = __import__(mod)
        except Exception:  # noqa: BLE001 - absent peers are simply not listed
            continue
        version = getattr(m, "__version__", None)
        if version is None:  # liger_kernel has no __version__; its distribution metadata does
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                version = "?"
        env[mod] = version
    return env


def ceilings() -> dict[str, float]:
    return {"copy_gbs": copy_bandwidth_gbs(), "bf16_tflops": matmul_tflops()}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n"
    body = "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body


def write_results(what: str, title: str, sections: list[tuple[str, str]], out_dir: Path | None = None) -> Path:
    """Write ``<date>-<card>-<what>.md`` with an environment header, the ceilings and the given sections
    (heading, markdown body). Written to a temporary name and renamed, so a crash leaves no half file."""
    env = environment()
    out_dir = RESULTS_DIR if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{env['date']}-{card_slug()}-{what}.md"
    c = ceilings()
    text = [f"# {title}\n", "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in env.items()),
            f"\nCeilings measured in this run: copy {c['copy_gbs']:.0f} GB/s, bf16 matmul "
            f"{c['bf16_tflops']:.0f} TFLOP/s.\n"]
    for heading, body in sections:
        text.append(f"\n## {heading}\n\n{body}")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("".join(text))
    tmp.replace(path)
    return path


# ---- shared benchmark plumbing ------------------------------------------------------------------------------

def graph_us(fn) -> float | None:
    """Median µs of one replay of ``fn`` captured in a CUDA graph: the GPU time of the op, without the
    Python/launch overhead that an eager call of a ~100 µs op is dominated by (a training step overlaps that
    host time with earlier GPU work). None when the provider cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return bench_us(graph.replay, warmup=10, rep=60)
    except Exception as e:  # noqa: BLE001 - eager time is reported instead
        print(f"  CUDA graph capture failed ({type(e).__name__}: {str(e)[:100]}); eager time reported", flush=True)
        torch.cuda.synchronize()
        return None


def capture_graph(calls) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of the callables ``calls`` in order (each run once first on a side stream, as capture needs),
    replayed once before it is returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_us(graph, calls: int, reps: int = 5) -> float:
    """Median µs per call of a CUDA graph holding ``calls`` calls: ``reps`` replays, each between CUDA events."""
    import statistics

    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def peak_mib(fn) -> float:
    """MiB that one call of ``fn`` allocates above what was held before it (after a first, warming call)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_and_peak(fn) -> tuple[float, float, float]:
    """(µs: CUDA-graph replay when capturable, else eager; peak MiB of one eager call; eager µs)."""
    peak = peak_mib(fn)
    eager = bench_us(fn, warmup=10, rep=60)
    graph = graph_us(fn)
    return (eager if graph is None else graph), peak, eager


def peer_bench_args(name: str, only_unsloth_help: str = "measure unsloth only (run under PEERS_UNSLOTH=1)"):
    """The command line of a kernel bench with an unsloth-only mode; refuses to run without a CUDA device."""
    import argparse
    import sys

    doc = (sys.modules["__main__"].__doc__ or name).splitlines()[0]
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--only-unsloth", action="store_true", help=only_unsloth_help)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"bench/{name}.py measures a CUDA device; none is available here")
    return args


def publish(what: str, title: str, body: str, notes: str, summary: str) -> Path:
    """Print a bench's table, notes and target lines and write them as ``<date>-<card>-<what>.md``."""
    print(body + notes + summary)
    path = write_results(what, title, [("Results", body + notes), ("Targets", summary)])
    print(f"wrote {path}")
    return path


def error_cell(e: BaseException) -> str:
    """One table cell for a provider that could not run; the whole traceback goes to the log."""
    import traceback

    traceback.print_exception(e)
    if isinstance(e, ImportError):
        return f"not installed ({getattr(e, 'name', None) or e})"
    msg = str(e).splitlines()[0][:120] if str(e) else ""
    return f"failed: {type(e).__name__}: {msg}"


def _row_cache_path(what: str) -> Path:
    return RESULTS_DIR / f".{what}-rows-{card_slug()}.json"


def load_rows(what: str) -> list:
    """Rows a bench stored for this card (e.g. peers measured in their own process, such as unsloth's)."""
    import json

    try:
        return json.loads(_row_cache_path(what).read_text())
    except (OSError, ValueError):
        return []


def save_rows(what: str, rows: list) -> None:
    import json

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    _row_cache_path(what).write_text(json.dumps(rows))


def rows_with_unsloth(what: str, only_unsloth: bool, measure_ours_and_peers, measure_unsloth, missing) -> list:
    """The rows of ``bench.<what>``, with unsloth measured in a process of its own (importing unsloth patches
    transformers and peft, so it must not share a process with the other providers).

    ``--only-unsloth`` (under PEERS_UNSLOTH=1) measures unsloth and stores its rows beside the cached others;
    a main run measures everyone else, and with PEERS_UNSLOTH=1 starts that unsloth process itself, then
    merges the stored unsloth rows. ``missing(reason)`` gives the placeholder rows when unsloth was not run.
    """
    import os
    import subprocess
    import sys

    cached = load_rows(what)
    if only_unsloth:
        try:
            import unsloth  # noqa: F401  (first: it patches transformers and peft)
        except Exception as e:  # noqa: BLE001 - reported in the table through the provider's own import
            print(f"unsloth not importable: {type(e).__name__}: {e}")
        rows = measure_unsloth() + [r for r in cached if r["provider"] != "unsloth"]
    else:
        rows = measure_ours_and_peers()
        uns = [r for r in cached if r["provider"] == "unsloth"]
        if os.environ.get("PEERS_UNSLOTH") == "1":
            save_rows(what, rows)
            try:
                subprocess.run([sys.executable, "-m", f"bench.{what}", "--only-unsloth"], timeout=400, check=False)
                uns = [r for r in load_rows(what) if r["provider"] == "unsloth"]
            except subprocess.TimeoutExpired:
                print("unsloth subprocess timed out")
        rows += uns or missing(f"not run (python -m bench.{what} --only-unsloth under PEERS_UNSLOTH=1)")
    save_rows(what, rows)
    return rows


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("bench/hw.py measures a CUDA device; none is available here")
    c = ceilings()
    print(f"{card_name()}: copy {c['copy_gbs']:.0f} GB/s, bf16 matmul {c['bf16_tflops']:.0f} TFLOP/s")
