"""The CUDA C++ cross-entropy row kernel (csrc/ce_rows.cu): loss, lse and the gradient in one launch, each logit
read once (the row split over a thread-block cluster). CPU: the launcher's choices and errors, and an nvcc
compile for sm_90. GPU: every variant against an fp32 torch reference and against the Triton row kernel."""
import shutil

import pytest
import torch

from csrc import ce_rows
from triton_ops.cross_entropy import ce_launch, rows_backend
from triton_ops.fused_linear_cross_entropy import fused_linear_cross_entropy


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_ce_rows_cu_compiles_for_sm90():
    from csrc import nvcc_compile_check

    nvcc_compile_check("ce_rows.cu", arch="sm_90")


def test_variant_pick_and_slices():
    assert ce_rows.pick(128256).name == "t256_p8_c8_rc"
    assert ce_rows.pick(32000).name == "t256_p4_c8_rc"
    assert ce_rows.pick(8).name == "t256_p2_c4"
    assert ce_rows.MAX_VOCAB == 131072
    with pytest.raises(ValueError, match="exceeds the largest row"):
        ce_rows.pick(151936)
    with pytest.raises(ValueError, match="holds 16384 logits per row"):
        ce_rows.pick(32000, "t256_p2_c4")
    with pytest.raises(ValueError, match="unknown variant"):
        ce_rows.pick(32000, "t1_p1_c1")
    for v in (8, 72, 1000, 32000, 128256, 151936, 256000):
        for var in ce_rows.VARIANTS.values():
            w = ce_rows.slice_width(v, var.cluster)
            assert w % 8 == 0 and w * var.cluster >= v and (w - 8) * var.cluster < v
    # the templates the launcher names exist in the source, each for both 16-bit types
    src = ce_rows.__file__.replace(".py", ".cu")
    text = open(src).read()
    for var in ce_rows.VARIANTS.values():
        for dt in ("f16", "bf16"):
            assert f"ce_rows_{dt}_{var.name}," in text, var


def test_unsupported_reasons_and_errors(monkeypatch):
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert "CUDA" in ce_rows.unsupported(x, x, 0.0)
    assert "float16 or bfloat16" in ce_rows.unsupported(x.float(), x.float(), 0.0)
    assert "softcap" in ce_rows.unsupported(x, x, 30.0)
    assert "multiple of 8" in ce_rows.unsupported(x[:, :63], x[:, :63], 0.0)
    assert "at most 131072" in ce_rows.unsupported(torch.zeros(1, 131080, dtype=torch.bfloat16),
                                                   torch.zeros(1, 131080, dtype=torch.bfloat16), 0.0)
    odd = torch.zeros(4, 65, dtype=torch.bfloat16)[:, 1:]  # rows 130 bytes apart, base off by 2 bytes
    assert "16-byte aligned rows of logits" in ce_rows.unsupported(odd, x, 0.0)
    # backend="cuda" insists: a clear error where the kernel does not apply (here: CPU tensors)
    h = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 8, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 64, (4,))
    with pytest.raises(ValueError, match="rows backend 'cuda': the kernel needs CUDA tensors"):
        fused_linear_cross_entropy(h, w, y, backend="cuda")
    with pytest.raises(ValueError, match="'auto', 'triton', 'cuda' or 'torch'"):
        fused_linear_cross_entropy(h, w, y, backend="cutlass")
    # asked for through the environment, a launch the kernel cannot take (here: fp32, and on the CPU) runs the
    # Triton kernel instead; asked for by the caller, it is an error
    z0 = torch.randn(4, 64)
    out = {}
    for rows in ("triton", "auto"):
        monkeypatch.setenv("MINITRAIN_CE_ROWS", "cuda")
        z, loss, lse = z0.clone(), torch.empty(4), torch.empty(4)
        ce_launch(z, y, -100, 0.0, loss, lse, grad=z, scale=torch.full((), 0.25), rows=rows)
        out[rows] = z, loss, lse
    assert all(torch.equal(a, b) for a, b in zip(out["auto"], out["triton"]))
    with pytest.raises(ValueError, match="takes float16 or bfloat16 logits"):
        ce_launch(z0.clone(), y, -100, 0.0, torch.empty(4), torch.empty(4), grad=z0.clone(),
                  scale=torch.full((), 0.25), rows="cuda")
    monkeypatch.delenv("MINITRAIN_CE_ROWS")
    with pytest.raises(ValueError, match="rows backend must be"):
        rows_backend("cutlass")
    monkeypatch.delenv("MINITRAIN_CE_ROWS", raising=False)
    assert rows_backend() == "triton"  # the default
    monkeypatch.setenv("MINITRAIN_CE_ROWS", "fast")
    with pytest.raises(ValueError, match="MINITRAIN_CE_ROWS='fast'"):
        rows_backend()
    monkeypatch.setenv("MINITRAIN_CE_ROWS", "cuda")
    assert rows_backend() == "cuda"


# ---------------------------------------------------------------------------------------------- GPU

def _reference(x, y, scale, ignore_index=-100):
    """fp32 loss, lse and gradient (softmax - onehot) * scale; NaN loss for a label outside [0, V)."""
    z = x.float()
    lse = torch.logsumexp(z, 1)
    V = z.shape[1]
    valid = y != ignore_index
    inside = (y >= 0) & (y < V)
    zy = z.gather(1, y.clamp(0, V - 1)[:, None])[:, 0]
    loss = torch.where(valid, torch.where(inside, lse - zy, float("nan")), 0.0)
    g = torch.softmax(z, 1)
    rows = torch.nonzero(valid & inside).flatten()
    g[rows, y[rows]] -= 1
    s = scale.expand(len(y)) if scale.dim() == 0 else scale
    return loss, lse, g * torch.where(valid, s, 0.0)[:, None]


def _inputs(n, v, dtype):
    x = torch.randn(n, v, device="cuda") * 4
    y = torch.randint(0, v, (n,), device="cuda")
    y[torch.rand(n, device="cuda") < 0.25] = -100
    if n > 8:
        x[1, y[1] if y[1] >= 0 else 0] = 1e4    # one huge logit, at the label when the row counts
        x[2, :] = -1e4 * torch.rand(v, device="cuda")  # a row of extreme negatives
        x[3, 0] = 1e4
        y[3] = v - 1                             # label at the last column, far below the max
        y[4] = v                                 # not ignored, out of range: NaN loss, no out-of-bounds read
        y[5] = 0
        y[6] = (v // 8) * 3 if v >= 64 else 0    # a label at a slice boundary for most variants
    return x.to(dtype), y


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", sorted(ce_rows.VARIANTS))
def test_gpu_every_variant_matches_reference(variant, dtype):
    cap = ce_rows.VARIANTS[variant].capacity
    for v in (8, 72, 1000, 32000, 49152, 128256, 131072):
        if v > cap:
            continue
        for n, per_row in ((1, False), (37, True), (263, False)):
            x, y = _inputs(n, v, dtype)
            if dtype == torch.float16:
                x = x.clamp(-6e4, 6e4)
            scale = (torch.rand(n, device="cuda") + 0.5) if per_row else torch.full((), 1 / n, device="cuda")
            loss, lse = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
            g = torch.empty_like(x)
            ce_rows.launch_ce_rows(x, y, -100, loss, lse, g, scale, variant=variant,
                                   rows_per_cluster=3 if n > 8 else 1)
            r_loss, r_lse, r_g = _reference(x, y, scale)
            where = f"{variant} {dtype} V={v} N={n}"
            nan = torch.isnan(r_loss)
            assert torch.equal(torch.isnan(loss), nan), where
            assert torch.allclose(loss[~nan], r_loss[~nan], rtol=2e-6, atol=2e-5), (
                where, (loss - r_loss)[~nan].abs().max().item())
            assert torch.allclose(lse, r_lse, rtol=2e-6, atol=2e-5), where
            eps = torch.finfo(dtype).eps
            err = (g.float() - r_g).abs()
            # one rounding to the 16-bit type (half an ulp, or the subnormal spacing below the normal range), plus
            # a few fp32 ulps of the probabilities (in [0, 1], times the row's scale) from the approximate exp2:
            # at the label, g = p - 1 cancels when p is near 1 (seen: 5.4e-7 at p = 0.99955, scale 1, fp16 V=8)
            row_scale = (scale.expand(n) if scale.dim() == 0 else scale)[:, None]
            bound = eps * r_g.abs() + 1e-6 * row_scale + torch.finfo(dtype).tiny * eps
            assert (err <= bound).all(), (where, err.max().item(), int((err > bound).sum()))
            # in place: the same bits as out of place
            z = x.clone()
            loss2, lse2 = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
            ce_rows.launch_ce_rows(z, y, -100, loss2, lse2, z, scale, variant=variant)
            assert torch.equal(z, g) and torch.equal(loss2.nan_to_num(7.0), loss.nan_to_num(7.0)), where
            assert torch.equal(lse2, lse), where


@pytest.mark.gpu
def test_gpu_cuda_rows_agree_with_triton(monkeypatch):
    n, v = 2051, 128256
    x, y = _inputs(n, v, torch.bfloat16)
    y[4] = 17
    scale = torch.full((), 1 / n, device="cuda")
    out = {}
    monkeypatch.setenv("MINITRAIN_CE_ROWS", "cuda")
    for rows in ("cuda", "triton", "auto"):
        z = x.clone()
        loss, lse = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        ce_launch(z, y, -100, 0.0, loss, lse, grad=z, scale=scale, rows=rows)
        out[rows] = loss, lse, z
    assert all(torch.equal(a, b) for a, b in zip(out["auto"], out["cuda"]))  # auto = $MINITRAIN_CE_ROWS
    (loss_c, lse_c, g_c), (loss_t, lse_t, g_t) = out["cuda"], out["triton"]
    nan = torch.isnan(loss_t)
    assert torch.equal(torch.isnan(loss_c), nan) and nan.sum() == 0
    assert torch.allclose(loss_c, loss_t, rtol=2e-6, atol=2e-5) and torch.allclose(lse_c, lse_t, rtol=2e-6, atol=2e-5)
    # the two kernels round different fp32 values of the gradient: one bf16 ulp apart at most
    err = (g_c.float() - g_t.float()).abs()
    assert (err <= torch.finfo(torch.bfloat16).eps * g_t.float().abs() + 1e-12).all(), err.max().item()
    # softcap or V % 8 != 0: "cuda" says why
    z = x[:, :1001].clone()
    loss, lse = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    with pytest.raises(ValueError, match="multiple of 8"):
        ce_launch(z, y.clamp(max=1000), -100, 0.0, loss, lse, grad=z, scale=scale, rows="cuda")
    with pytest.raises(ValueError, match="softcap"):
        ce_launch(x.clone(), y, -100, 30.0, loss, lse, grad=x.clone(), scale=scale, rows="cuda")
