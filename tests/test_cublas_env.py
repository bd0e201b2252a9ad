"""minitrain's process-wide cuBLAS choice (minitrain/__init__.py): no workspace unless the process chose one."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = "import os, minitrain; print(repr(os.environ.get('CUBLAS_WORKSPACE_CONFIG')))"


def _run(**env):
    e = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", "MINITRAIN_CUBLAS_WORKSPACE")}
    e.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=120)


def test_no_workspace_by_default():
    assert _run().stdout.strip() == "':0:0'"


def test_a_value_the_process_has_is_kept():
    # e.g. torch.use_deterministic_algorithms needs :4096:8 or :16:8
    assert _run(CUBLAS_WORKSPACE_CONFIG=":4096:8").stdout.strip() == "':4096:8'"


def test_opt_out_and_bad_value():
    assert _run(MINITRAIN_CUBLAS_WORKSPACE="default").stdout.strip() == "None"
    r = _run(MINITRAIN_CUBLAS_WORKSPACE="off")
    assert r.returncode != 0 and "MINITRAIN_CUBLAS_WORKSPACE='off'" in r.stderr and "'none'" in r.stderr


def test_empty_values_count_as_unset():
    # `VAR= python ...` is how a shell clears a variable for one command: the default, not an error (as with
    # MINITRAIN_MLP_TILE), and an empty CUBLAS_WORKSPACE_CONFIG is no workspace choice of the process
    r = _run(MINITRAIN_CUBLAS_WORKSPACE="")
    assert r.returncode == 0 and r.stdout.strip() == "':0:0'", r.stderr
    assert _run(CUBLAS_WORKSPACE_CONFIG="").stdout.strip() == "':0:0'"
    assert _run(MINITRAIN_CUBLAS_WORKSPACE="default", CUBLAS_WORKSPACE_CONFIG="").stdout.strip() == "''"
