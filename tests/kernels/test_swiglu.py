"""SwiGLU over fc1's [value | gate] output: the Triton kernels (custom ops) against float64, in the MLP, and
under torch.compile."""

import dataclasses

import pytest
import torch
from kernel_checks import DEVICE, assert_close, grads, leaves

from kernels.swiglu import swiglu, swiglu_reference
from kernels.swiglu import triton_impl as impl

F32, BF16 = torch.float32, torch.bfloat16
# (leading shape, H): odd row counts, widths that are not powers of two, and one over a column block (1024)
CASES = [((1,), 1), ((3,), 48), ((2, 7), 100), ((5,), 1100)]
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
                 "test_aot_dispatch_dynamic")


def case_id(case) -> str:
    lead, hidden = case
    return "x".join(map(str, lead)) + f"-H{hidden}"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_swiglu_forward_and_gradient_match_float64(case, dtype):
    lead, hidden = case
    (y,), (y64,) = leaves([torch.randn(*lead, 2 * hidden, device=DEVICE) * 3], dtype)
    h = swiglu(y, backend="triton")
    h_ref = swiglu_reference(y64)
    assert h.dtype == dtype and h.shape == (*lead, hidden)
    assert_close("h", h, h_ref, dtype)
    cot = torch.randn_like(h_ref)
    (dy,), (dy_ref,) = grads([h], [y], [cot]), grads([h_ref], [y64], [cot])
    assert dy.dtype == dtype
    assert_close("dy", dy, dy_ref, dtype)


def test_swiglu_reads_rows_with_a_stride():
    """A view whose rows are longer than 2H (a slice of a wider buffer) is read in place, not misread."""
    wide = torch.randn(6, 2 * 40 + 9, device=DEVICE, dtype=torch.float64)
    y = wide[:, : 2 * 40].float().requires_grad_()
    strided = torch.empty(6, 2 * 40 + 9, device=DEVICE)[:, : 2 * 40]
    strided.copy_(y.detach())
    strided.requires_grad_()
    assert strided.stride(0) == 2 * 40 + 9
    h = swiglu(strided, backend="triton")
    torch.testing.assert_close(h, swiglu_reference(y.detach()), rtol=1e-6, atol=1e-6)
    cot = torch.randn_like(h)
    (d_strided,) = torch.autograd.grad(h, strided, cot)
    (d_plain,) = torch.autograd.grad(swiglu_reference(y), y, cot)
    torch.testing.assert_close(d_strided, d_plain, rtol=1e-5, atol=1e-6)


def test_opcheck_swiglu_ops():
    y = torch.randn(3, 5, 2 * 24, device=DEVICE).requires_grad_()
    for op, args in ((impl.swiglu_fwd, (y,)),
                     (impl.swiglu_bwd, (torch.randn(3, 5, 24, device=DEVICE), y.detach()))):
        result = torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)
        assert result == dict.fromkeys(OPCHECK_TESTS, "SUCCESS"), result


def test_swiglu_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"even last dimension.*\(2, 7\)"):
        swiglu(torch.randn(2, 7), backend="reference")
    with pytest.raises(ValueError, match="takes"):
        swiglu(torch.randn(2, 8, dtype=torch.float64, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="backend="):
        swiglu(torch.randn(2, 8), backend="cuda")


def _tiny_config(mlp_backend: str):
    from based_layers.config import ModelConfig

    return ModelConfig(d_model=32, n_layer=2, vocab_size=40, default_mixer="attention", mlp_hidden=48,
                       norm_backend="reference", mlp_backend=mlp_backend)


def _loss_and_grads(model, ids):
    logits = model(ids)
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_mlp_backend_triton_matches_the_plain_mlp(monkeypatch):
    """mlp_backend=triton runs the kernel in every block's MLP and gives the plain model's loss and gradients."""
    from based_layers import build_model

    calls = []
    original = impl.swiglu_triton
    monkeypatch.setattr(impl, "swiglu_triton", lambda y: calls.append(tuple(y.shape)) or original(y))
    torch.manual_seed(0)
    plain = build_model(_tiny_config("reference")).to(DEVICE)
    fused = build_model(_tiny_config("triton")).to(DEVICE)
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 40, (2, 13), device=DEVICE)
    want, got = _loss_and_grads(plain, ids), _loss_and_grads(fused, ids)
    assert calls == [(2, 13, 96)] * 2
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_mlp_backend_auto_is_plain_on_cpu_and_rejects_unknown_names():
    from based_layers.config import resolve_backend

    assert resolve_backend(_tiny_config("auto").mlp_backend, torch.zeros(1)) == "reference"
    errors = _tiny_config("fast").validate()
    assert any("model.mlp_backend: 'fast'; expected one of" in e for e in errors), errors


def test_compiled_mlp_keeps_swiglu_as_one_op_and_matches_eager():
    """fullgraph torch.compile with mlp_backend=triton: no graph break, the graph holds based::swiglu_fwd once
    per block, and forward and gradients equal eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from based_layers import build_model

    cfg = _tiny_config("triton")
    torch.manual_seed(0)
    eager, compiled = build_model(cfg).to(DEVICE), build_model(dataclasses.replace(cfg)).to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    ids = torch.randint(0, 40, (2, 11), device=DEVICE)
    want = _loss_and_grads(eager, ids)
    got = _loss_and_grads(torch.compile(compiled, backend=counter, fullgraph=True), ids)
    assert len(counter.graphs) == 1
    calls = [str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("based.swiglu_fwd" in t for t in calls) == cfg.n_layer, calls
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for name, grad in want[1].items():
        torch.testing.assert_close(compiled.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-7, msg=name)
