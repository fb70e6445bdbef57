"""Residual add + RMSNorm: the Triton kernel (a custom op) against float64, and the plain path it replaces."""

import pytest
import torch
from kernel_checks import DEVICE, assert_close, grads, leaves

from kernels.fused_norm import add_rms_norm, add_rms_norm_reference, rms_norm_reference
from kernels.fused_norm.triton_impl import add_rms_norm_fwd

# (leading shape, D): odd row counts and widths that are not powers of two
CASES = [((1,), 8), ((2, 17), 48), ((3, 37), 100), ((2, 5), 1792)]
F32, BF16 = torch.float32, torch.bfloat16
# (x dtype, update dtype, out dtype, residual dtype); the first is the model's: fp32 stream, bf16 compute
DTYPES = {
    "stream32-bf16": (F32, BF16, BF16, F32),
    "all32": (F32, F32, F32, F32),
    "allbf16": (BF16, BF16, BF16, BF16),
}


def case_id(case) -> str:
    lead, dim = case
    return "x".join(map(str, lead)) + f"-D{dim}"


def _bound_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return BF16 if BF16 in dtypes else F32


@pytest.mark.parametrize("dtypes", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_add_rms_norm_forward_and_gradients_match_float64(case, dtypes):
    lead, dim = case
    x_dt, u_dt, out_dt, res_dt = DTYPES[dtypes]
    (x,), (x64,) = leaves([torch.randn(*lead, dim, device=DEVICE) * 3], x_dt)
    (u,), (u64,) = leaves([torch.randn(*lead, dim, device=DEVICE)], u_dt)
    (w,), (w64,) = leaves([torch.rand(dim, device=DEVICE) + 0.5], F32)
    y, res = add_rms_norm(x, u, w, eps=1e-5, out_dtype=out_dt, residual_dtype=res_dt, backend="triton")
    y_ref, res_ref = add_rms_norm_reference(
        x64, u64, w64, eps=1e-5, out_dtype=torch.float64, residual_dtype=torch.float64
    )
    assert (y.dtype, res.dtype) == (out_dt, res_dt)
    bound = _bound_dtype(out_dt, res_dt)
    assert_close("y", y, y_ref, bound)
    assert_close("residual", res, res_ref, _bound_dtype(res_dt))
    cot_y, cot_r = torch.randn_like(y_ref), torch.randn_like(res_ref)
    got = grads([y, res], [x, u, w], [cot_y, cot_r])
    want = grads([y_ref, res_ref], [x64, u64, w64], [cot_y, cot_r])
    for name, g, g_ref, t in zip(["dx", "dupdate", "dweight"], got, want, [x, u, w], strict=True):
        assert g.dtype == t.dtype, f"{name}: dtype {g.dtype} != {t.dtype}"
        assert_close(name, g, g_ref, bound)


@pytest.mark.parametrize("x_dt", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rms_norm_without_update_matches_float64(case, x_dt):
    lead, dim = case
    (x,), (x64,) = leaves([torch.randn(*lead, dim, device=DEVICE)], x_dt)
    (w,), (w64,) = leaves([torch.rand(dim, device=DEVICE) + 0.5], F32)
    y = add_rms_norm(x, None, w, eps=1e-5, out_dtype=BF16, backend="triton")
    y_ref = rms_norm_reference(x64, w64, 1e-5, torch.float64)
    assert y.dtype == BF16
    assert_close("y", y, y_ref, BF16)
    cot = torch.randn_like(y_ref)
    for name, g, g_ref in zip(
        ["dx", "dweight"], grads([y], [x, w], [cot]), grads([y_ref], [x64, w64], [cot]), strict=True
    ):
        assert_close(name, g, g_ref, BF16)


def test_reference_is_the_unfused_model_path():
    """backend='reference' computes exactly Block._add + RMSNorm.forward (bit for bit)."""
    from based_layers.norm import RMSNorm

    norm = RMSNorm(40)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x, u = torch.randn(3, 5, 40), torch.randn(3, 5, 40).to(BF16)
    y, res = add_rms_norm(x, u, norm.weight, eps=norm.eps, backend="reference", residual_dtype=F32)
    expected_res = x.float() + u.float()
    assert torch.equal(res, expected_res)
    assert torch.equal(y, norm(expected_res))


@pytest.mark.parametrize("with_update", [True, False], ids=["update", "no-update"])
def test_custom_op_passes_opcheck(with_update):
    x = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    u = torch.randn(2, 9, 24, device=DEVICE, dtype=BF16, requires_grad=True) if with_update else None
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    torch.library.opcheck(add_rms_norm_fwd, (x, u, w, 1e-5, BF16, F32))


def test_bad_input_is_a_clear_error():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"weight \[D\]"):
        add_rms_norm(x, None, torch.ones(8), eps=1e-5, backend="reference")
    with pytest.raises(ValueError, match="update must have x's shape"):
        add_rms_norm(x, torch.randn(4, 8), torch.ones(16), eps=1e-5, backend="reference")
    with pytest.raises(ValueError, match="backend="):
        add_rms_norm(x, None, torch.ones(16), eps=1e-5, backend="cuda")


def test_compiled_model_keeps_the_fused_norm_as_one_op_and_matches_eager():
    """fullgraph torch.compile of a tiny model with norm_backend=triton: no graph break, the graph holds
    based::add_rms_norm_fwd (with and without the residual add), and forward and gradients equal eager's."""
    import dataclasses

    from torch._dynamo.testing import CompileCounterWithBackend

    from based_layers import build_model
    from based_layers.config import ModelConfig

    cfg = ModelConfig(
        d_model=32, n_layer=1, vocab_size=40, default_mixer="attention", mlp_hidden=48, norm_backend="triton"
    )
    torch.manual_seed(0)
    eager, compiled = build_model(cfg).to(DEVICE), build_model(dataclasses.replace(cfg)).to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    fn = torch.compile(compiled, backend=counter, fullgraph=True)
    ids = torch.randint(0, 40, (2, 11), device=DEVICE)
    outs = []
    for model, call in ((eager, eager), (compiled, fn)):
        logits = call(ids)
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert len(counter.graphs) == 1
    calls = [str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("based.add_rms_norm_fwd" in t for t in calls) == 2 * cfg.n_layer + 1, calls
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
