"""rank_update_: y += alpha * a @ b^T in one pass, against the fp32 reference and torch's addmm_ in y's dtype."""
import pytest
import torch

from triton_ops.rank_update import MAX_R, rank_update_, rank_update_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}  # x max |reference|

CPU_SHAPES = [  # (M, N, R)
    (16, 32, 16),     # one tile, the rank of one dot
    (37, 70, 4),      # odd rows and columns, a rank under the dot's minimum (masked up to 16)
    (19, 45, 80),     # a rank over one rank block (GPU: 64 wide, a loop of two; interpreter: 16 wide, five)
    (3, 1, 1),        # one column, rank 1
]
GPU_SHAPES = [
    (4096, 14336, 16),   # realistic: gate / up output of Llama-3-8B at 4096 tokens, r=16
    (4096, 6144, 48),    # q|k|v side by side, three r=16 adapters
    (4096, 4096, 16),    # dx of an attention projection
    (1037, 4100, 8),     # odd everything
    (5, 14336, 128),     # decode-sized M, the largest rank the kernel takes
]


def check(name, out, same, ref32, atol_rel):
    """Kernel error vs fp32 <= 2 x (same-precision torch error) + small atol; report where it fails."""
    err = (out.float() - ref32.float()).abs()
    ref_err = (same.float() - ref32.float()).abs().max().item()
    bound = 2 * ref_err + atol_rel * max(1.0, ref32.abs().max().item())
    if out.dtype != torch.float32 and out.device.type == "cpu":
        # Triton's CPU interpreter casts fp32 -> 16-bit by truncation (GPUs round to nearest even): one more ulp
        bound = bound + 2.0 ** (-7 if out.dtype == torch.bfloat16 else -10) * ref32.float().abs()
    else:
        bound = torch.full_like(err, bound)
    if (err > bound).any():
        i = (err - bound).argmax().item()
        where = tuple(int(w) for w in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{name}: error {err.view(-1)[i].item():.3g} at {where} > bound "
                             f"{bound.view(-1)[i].item():.3g} (same-precision torch error {ref_err:.3g}); "
                             f"{int((err > bound).sum())} of {err.numel()} elements exceed it")


def _inputs(M, N, R, dtype, device, b_transposed=False, y_slice=False):
    y = torch.randn(M, N + (7 if y_slice else 0), device=device).to(dtype)
    if y_slice:
        y = y[:, 3:3 + N]  # a column slice: row stride N + 7
    a = torch.randn(M, R, device=device).to(dtype)
    b = (torch.randn(R, N, device=device).to(dtype).t() if b_transposed   # (N, R) with strides (1, N)
         else torch.randn(N, R, device=device).to(dtype))
    return y, a, b


def _run(M, N, R, dtype, device, alpha=0.75, **layout):
    y, a, b = _inputs(M, N, R, dtype, device, **layout)
    ref32 = rank_update_ref(y.float(), a.float(), b.float(), alpha)
    same = y.clone().addmm_(a, b.t(), alpha=alpha)
    out = y.clone() if not layout.get("y_slice") else y
    before = out.data_ptr()
    got = rank_update_(out, a, b, alpha, kernel=True)
    assert got is out and out.data_ptr() == before and out.dtype == dtype
    check(f"rank_update_ {(M, N, R)} {dtype} {layout}", out, same, ref32, ATOL[dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_cpu(shape, dtype, device):
    _run(*shape, dtype, device)


@pytest.mark.parametrize("layout", [dict(b_transposed=True), dict(y_slice=True)], ids=["b-transposed", "y-slice"])
def test_strides(layout, device):
    """b as a transposed view (the dx term dx += dyB @ A) and y as a column slice of a wider buffer."""
    _run(21, 40, 16, torch.bfloat16, device, **layout)


def test_slice_leaves_the_rest_alone(device):
    wide = torch.randn(9, 50, device=device).to(torch.bfloat16)
    keep = wide.clone()
    a, b = torch.randn(9, 16, device=device).to(torch.bfloat16), torch.randn(30, 16, device=device).to(torch.bfloat16)
    rank_update_(wide[:, 10:40], a, b, 1.0, kernel=True)
    assert torch.equal(wide[:, :10], keep[:, :10]) and torch.equal(wide[:, 40:], keep[:, 40:])
    assert not torch.equal(wide[:, 10:40], keep[:, 10:40])


def test_default_path_on_cpu_is_addmm():
    """Without a CUDA tensor (and not forced) the op is torch's addmm_, bit for bit."""
    y, a, b = _inputs(8, 24, 4, torch.float32, "cpu")
    assert torch.equal(rank_update_(y.clone(), a, b, 0.5), y.clone().addmm_(a, b.t(), alpha=0.5))


def test_forced_kernel_takes_any_rank(device):
    """kernel=True runs the kernel even above MAX_R (the default rule sends those to cuBLAS)."""
    _run(5, 9, MAX_R + 3, torch.float32, device)


def test_autograd_and_dispatch_go_through_the_op(device):
    """An input that requires grad (with grad mode on) or an active dispatch mode takes the registered op, not the
    direct launch: the op is visible to autograd's version check and to the mode."""
    import triton_ops.rank_update as ru

    y, a, b = _inputs(8, 16, 4, torch.float32, device)
    assert ru._plain_call(y, a, b)
    a.requires_grad_()
    assert not ru._plain_call(y, a, b)
    with torch.no_grad():
        assert ru._plain_call(y, a, b)
    a.requires_grad_(False)
    seen = []

    class Log(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Log():
        rank_update_(y, a, b, 1.0, kernel=True)
    assert "rank_update_" in seen, seen


def test_version_counter_bumps(device):
    y, a, b = _inputs(8, 16, 4, torch.float32, device)
    v = y._version
    rank_update_(y, a, b, 1.0, kernel=True)
    assert y._version > v


def test_wrapper_under_compile(device):
    """The public function inside torch.compile(fullgraph=True) (the wrapper's compiling branch)."""
    y, a, b = _inputs(37, 70, 4, torch.float32, device)
    want = y.clone().addmm_(a, b.t(), alpha=0.5)

    def f(y, a, b):
        rank_update_(y, a, b, 0.5, kernel=True)
        return y * 2

    got = torch.compile(f, fullgraph=True)(y.clone(), a, b)
    check("compiled rank_update_ wrapper", got / 2, want, rank_update_ref(y, a, b, 0.5), ATOL[torch.float32])


@pytest.mark.parametrize("bad, match", [
    (lambda y, a, b: (y, a[:, :3], b), "a \\(M, R\\)"),
    (lambda y, a, b: (y, a, b[:5]), "b \\(N, R\\)"),
    (lambda y, a, b: (y, a.float(), b), "one dtype"),
    (lambda y, a, b: (y.t(), a, b), "expected y"),
    (lambda y, a, b: (y.int(), a, b), "float16, bfloat16 or float32"),
    (lambda y, a, b: (y[0], a, b), "2-D"),
    (lambda y, a, b: (y[:1].expand(6, 10), a, b), "rows overlap"),
])
def test_errors(bad, match, device):
    y, a, b = _inputs(6, 10, 4, torch.bfloat16, device)
    with pytest.raises((ValueError, TypeError), match=match):
        rank_update_(*bad(y, a, b), kernel=True)


def test_column_stride_error(device):
    y = torch.randn(10, 6, device=device).to(torch.bfloat16).t()  # (6, 10) with column stride 6
    a, b = torch.randn(6, 4, device=device).to(torch.bfloat16), torch.randn(10, 4, device=device).to(torch.bfloat16)
    with pytest.raises(ValueError, match="unit column stride"):
        rank_update_(y, a, b, kernel=True)


def test_compile_fullgraph(device):
    y, a, b = _inputs(37, 70, 4, torch.float32, device)
    want = y.clone().addmm_(a, b.t(), alpha=0.5)

    def f(y, a, b):
        torch.ops.minitrain.rank_update_(y, a, b, 0.5)
        return y * 2

    got = torch.compile(f, fullgraph=True)(y.clone(), a, b)
    ref = rank_update_ref(y, a, b, 0.5)
    check("compiled rank_update_", got / 2, want, ref, ATOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu(shape, dtype):
    _run(*shape, dtype, "cuda")


@pytest.mark.gpu
def test_gpu_default_path():
    """kernel=None: addmm_ for a small output, the kernel for a large one (also inside a CUDA-graph capture)."""
    import triton_ops.rank_update as ru

    y, a, b = _inputs(256, 512, 16, torch.bfloat16, "cuda")
    assert not ru.uses_kernel(y, 16)
    assert torch.equal(rank_update_(y.clone(), a, b), y.clone().addmm_(a, b.t()))
    y, a, b = _inputs(4096, ru.MIN_NUMEL // 4096, 16, torch.bfloat16, "cuda")
    assert ru.uses_kernel(y, 16) and not ru.uses_kernel(y, ru.MAX_R + 1)
    forced = rank_update_(y.clone(), a, b, kernel=True)
    assert torch.equal(rank_update_(y.clone(), a, b), forced)
    out = y.clone()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        rank_update_(out, a, b)
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, forced)
    check("default CUDA path", out, y.clone().addmm_(a, b.t()), rank_update_ref(y, a, b, 1.0), ATOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [dict(b_transposed=True), dict(y_slice=True)], ids=["b-transposed", "y-slice"])
def test_gpu_strides(layout):
    _run(4096, 4096, 48, torch.bfloat16, "cuda", **layout)
