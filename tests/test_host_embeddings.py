"""The input embedding kept in pinned host memory (minitrain.model.offload_input_embeddings) and its row gather
(triton_ops.host_gather): the same bits as nn.Embedding, in eager and CUDA-graph training and in generation."""
import pytest
import torch

from minitrain.model import model_device, offload_input_embeddings
from triton_ops.host_gather import gather_rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gather_rows_bits_and_bad_ids(dtype, device):
    table = torch.randn(50, 37).to(dtype)  # C = 37: a ragged last block
    if device == "cuda":
        table = table.pin_memory()
    ids = torch.tensor([[3, 0, 49], [7, 50, -1]], device=device)
    out = gather_rows(table, ids)
    assert out.shape == (2, 3, 37) and out.device.type == device and out.dtype == dtype
    assert torch.equal(out[0].cpu(), table[[3, 0, 49]]) and torch.equal(out[1, 0].cpu(), table[7])
    assert torch.isnan(out[1, 1:]).all(), "an id outside [0, V) must give a NaN row, not another row"
    assert torch.equal(gather_rows(table, ids.to(torch.int32))[0].cpu(), table[[3, 0, 49]])
    assert gather_rows(table, ids[:, :0]).shape == (2, 0, 37)


def test_gather_rows_errors():
    t = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unit stride"):
        gather_rows(t.t(), torch.tensor([0]))
    with pytest.raises(TypeError, match="2 or 4 bytes"):
        gather_rows(torch.zeros(4, 8, dtype=torch.int8), torch.tensor([0]))
    with pytest.raises(TypeError, match="int64 or int32"):
        gather_rows(t, torch.tensor([0.0]))


def _tiny(device, tie=False):
    from test_cuda_graphs import model_with_lora

    model = model_with_lora(device, torch.bfloat16 if device == "cuda" else torch.float32)
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def test_offload_refusals_on_cpu():
    model = _tiny("cpu")
    assert model_device(model) == torch.device("cpu")
    with pytest.raises(ValueError, match="not a CUDA device"):
        offload_input_embeddings(model)
    with pytest.raises(ValueError, match="ties"):
        offload_input_embeddings(_tiny("cpu", tie=True))
    model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        offload_input_embeddings(model)
    with pytest.raises(TypeError, match="no model.embed_tokens"):
        offload_input_embeddings(torch.nn.Linear(2, 2))


@pytest.mark.gpu
def test_gpu_offloaded_embedding_trains_and_generates_the_same():
    from minitrain.trainer import token_loss_sum
    from test_cuda_graphs import grads, random_batch

    from minitrain.cuda_graphs import GraphedLoss, zero_grads

    def build(offload):
        model = _tiny("cuda")
        if offload:
            emb = model.model.embed_tokens
            assert offload_input_embeddings(model) == emb.weight.numel() * emb.weight.element_size()
            assert offload_input_embeddings(model) == 0  # already offloaded
            assert emb.weight.device.type == "cpu" and emb.weight.is_pinned() and model_device(model).type == "cuda"
        return model

    batch = random_batch(2, 24, "cuda", seed=1)
    n = int((batch["labels"][:, 1:] != -100).sum())

    def eager(model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = token_loss_sum(model, batch) / n
        loss.backward()
        return loss.detach(), grads(model)

    def graphed(model):  # three replays of the trainer's CUDA graph (a fresh model: no eager autograd graph)
        gl = GraphedLoss(model, 2, 24, warmup=1)
        for _ in range(3):
            zero_grads(gl.params)
            loss = gl(batch, n).detach()
        assert gl.graph is not None
        return loss, grads(model)

    a, b = build(False), build(True)
    assert torch.equal(a.model(batch["input_ids"]), b.model(batch["input_ids"]))  # same bits
    ids = batch["input_ids"][:1, :8]
    assert torch.equal(a.generate(ids, 5), b.generate(ids, 5))
    for run in (eager, graphed):
        (la, ga), (lb, gb) = run(build(False)), run(build(True))
        assert torch.allclose(la, lb, rtol=0, atol=1e-6), (run.__name__, la, lb)
        for name in ga:  # (cuDNN's attention backward is not bitwise repeatable)
            assert torch.allclose(ga[name], gb[name], rtol=1e-3, atol=1e-5), (run.__name__, name)


def test_offload_embeddings_setting_and_lookup_fallbacks(monkeypatch):
    """Opt-in: set_gradient_checkpointing("offload") leaves the embedding alone unless asked (argument,
    OFFLOAD_EMBEDDINGS or MINITRAIN_OFFLOAD_EMBEDDINGS=1), and warns when asked where it cannot apply. The lookup
    follows the weight: a plain lookup on the device after ``.to()``, a host lookup when the weight is on the host
    but not pinned; ``model_device`` skips the host weight."""
    import warnings

    import minitrain.trainer as mt
    from minitrain.model import HostEmbeddingLookup

    model = _tiny("cpu")
    monkeypatch.delenv("MINITRAIN_OFFLOAD_EMBEDDINGS", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mt.set_gradient_checkpointing(model, "offload")  # default: nothing tried, nothing said
    monkeypatch.setenv("MINITRAIN_OFFLOAD_EMBEDDINGS", "1")
    with pytest.warns(UserWarning, match="stays on the device .*not a CUDA device"):
        mt.set_gradient_checkpointing(model, "offload")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mt.set_gradient_checkpointing(model, "offload", offload_embeddings=False)  # the argument wins
    mt.set_gradient_checkpointing(model, "off")
    with pytest.warns(UserWarning, match="keep_mlp_layers=2 applies to gradient_checkpointing='offload' only"):
        mt.set_gradient_checkpointing(model, "on", keep_mlp_layers=2)
    mt.set_gradient_checkpointing(model, "off")
    # a lookup as offload_input_embeddings leaves it, on a CPU model (the weight not pinned: gathered on the host)
    emb = model.model.embed_tokens
    emb.minitrain_lookup = HostEmbeddingLookup(emb, torch.device("cuda"))
    ids = torch.randint(0, emb.num_embeddings, (2, 5))
    assert torch.equal(emb.minitrain_lookup(ids), emb(ids))
    assert model_device(model) == torch.device("cpu")  # the other parameters' device, not the lookup's
    hooked = _tiny("cpu")
    hooked.model.embed_tokens.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="hooks"):
        offload_input_embeddings(hooked)
