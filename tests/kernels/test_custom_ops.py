"""The Triton kernels as PyTorch custom ops (based::*): torch.library.opcheck on each op (schema, autograd
registration, fake tensors, AOT dispatch with static and dynamic shapes) and a fullgraph torch.compile of a
tiny Based model that runs the kernels inside the graph and matches eager.

On CPU the ops run the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) at small shapes.
"""

import dataclasses

import pytest
import torch
from kernel_checks import DEVICE, packed_doc_ids

pytest.importorskip("triton")

from based_layers import build_model  # noqa: E402
from based_layers.config import BaseConvConfig, LinearAttnConfig, ModelConfig, SlidingWindowConfig  # noqa: E402
from kernels.short_conv import ops as conv_ops  # noqa: E402
from kernels.sliding_window import ops as swa_ops  # noqa: E402
from kernels.taylor_linear_attn import ops as la_ops  # noqa: E402

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
                 "test_aot_dispatch_dynamic")


def _opcheck(op, args) -> None:
    result = torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)
    assert result == dict.fromkeys(OPCHECK_TESTS, "SUCCESS"), result


def _req(*shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (shift + scale * torch.randn(*shape, device=DEVICE, dtype=dtype)).requires_grad_()


@pytest.mark.parametrize("with_state", [False, True], ids=["plain", "docs+state"])
def test_opcheck_linear_attention_forward(with_state):
    b, t, h, f, dv = 2, 20, 1, 4, 8
    q, k, v = _req(b, t, h, f), _req(b, t, h, f), _req(b, t, h, dv)
    # 16-token chunks: the chunk states cross a chunk boundary
    tiles = la_ops.tiles_arg(chunk_size=16)
    if with_state:
        nf = 1 + f + f * f
        docs = packed_doc_ids(b, t, [7, 13])
        args = (q, k, v, docs, _req(b, h, nf, dv, scale=0.3), _req(b, h, nf, shift=1.5, scale=0.1), 1e-12, True,
                tiles)
    else:
        args = (q, k, v, None, None, None, 1e-12, False, tiles)
    _opcheck(la_ops.taylor_linear_attention_fwd, args)


def test_opcheck_linear_attention_backward_and_step():
    b, t, h, f, dv = 1, 12, 2, 4, 8
    q, k, v = (torch.randn(b, t, h, d, device=DEVICE) for d in (f, f, dv))
    tiles = la_ops.tiles_arg()
    o, den, states, zst, _, _ = la_ops.taylor_linear_attention_fwd(q, k, v, None, None, None, 1e-12, False, tiles)
    _opcheck(la_ops.taylor_linear_attention_bwd,
             (torch.randn_like(o), q, k, v, None, o, den, states, zst, None, None, False, tiles))
    nf = 1 + f + f * f
    step = (torch.randn(3, h, f, device=DEVICE), torch.randn(3, h, f, device=DEVICE),
            torch.randn(3, h, dv, device=DEVICE), torch.randn(3, h, nf, dv, device=DEVICE),
            1.0 + torch.rand(3, h, nf, device=DEVICE), 1e-12)
    _opcheck(la_ops.taylor_linear_attention_step, step)


# the window ops' tiles argument with every field unset (the table, then the built-in defaults)
SWA_UNSET = [0] * len(swa_ops.INT_FIELDS)


@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
def test_opcheck_sliding_window(docs):
    b, t, h, d = 2, 19, 2, 16
    doc_ids = packed_doc_ids(b, t, [5, 14]) if docs else None
    args = (_req(b, t, h, d), _req(b, t, h, d), _req(b, t, h, d), doc_ids, 6, d**-0.5, SWA_UNSET, "")
    _opcheck(swa_ops.sliding_window_fwd, args)


def test_opcheck_sliding_window_backward_and_step():
    b, t, h, d, w = 1, 10, 1, 16, 4
    q, k, v = (torch.randn(b, t, h, d, device=DEVICE) for _ in range(3))
    o, lse = swa_ops.sliding_window_fwd(q, k, v, None, w, d**-0.5, SWA_UNSET, "")
    _opcheck(swa_ops.sliding_window_bwd, (torch.randn_like(o), q, k, v, None, o, lse, w, d**-0.5, SWA_UNSET, ""))
    cache = [torch.randn(2, w, h, d, device=DEVICE) for _ in range(2)]
    pos = torch.tensor([0, 6], device=DEVICE)
    step = (*(torch.randn(2, h, d, device=DEVICE) for _ in range(3)), *cache, pos, d**-0.5)
    _opcheck(swa_ops.sliding_window_step, step)


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "docs+initial"])
def test_opcheck_short_conv(extras):
    b, t, c, ks = 2, 9, 12, 3
    doc_ids = packed_doc_ids(b, t, [4, 5]) if extras else None
    init = torch.randn(b, c, ks - 1, device=DEVICE) if extras else None
    args = (_req(b, t, c), _req(b, t, c), _req(c, ks, scale=0.5), doc_ids, init)
    _opcheck(conv_ops.short_conv_gated_fwd, args)


def test_opcheck_short_conv_backward_and_step():
    b, t, c, ks = 1, 7, 8, 3
    u1, u2, dy = (torch.randn(b, t, c, device=DEVICE) for _ in range(3))
    weight = torch.randn(c, ks, device=DEVICE)
    _opcheck(conv_ops.short_conv_gated_bwd, (dy, u1, u2, weight, None, None))
    step = (torch.randn(2, c, device=DEVICE), torch.randn(2, c, device=DEVICE), weight,
            torch.randn(2, c, ks, device=DEVICE))
    _opcheck(conv_ops.short_conv_gated_step, step)


def _tiny_based(backend: str) -> ModelConfig:
    return ModelConfig(d_model=32, n_layer=3, vocab_size=50, pad_vocab_size_multiple=8, default_mixer="base_conv",
                       mixer_layers={"linear_attn": [1], "sliding_window": [2]}, mlp_hidden=48,
                       base_conv=BaseConvConfig(backend=backend),
                       linear_attn=LinearAttnConfig(num_heads=2, feature_dim=8, head_dim=16, backend=backend),
                       sliding_window=SlidingWindowConfig(num_heads=2, window=7, backend=backend))


def test_compiled_based_model_has_no_graph_breaks_and_matches_eager():
    """fullgraph=True fails on any graph break; the graph must hold our kernels as based:: ops (not a
    decomposition), and the compiled forward and every gradient equal eager's."""
    torch.manual_seed(0)
    eager = build_model(_tiny_based("triton")).to(DEVICE)
    compiled_model = build_model(dataclasses.replace(_tiny_based("triton"))).to(DEVICE)
    compiled_model.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 50, (2, 21), device=DEVICE)
    doc_ids = torch.tensor([[0] * 8 + [1] * 13, [0] * 21], device=DEVICE)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    fn = torch.compile(compiled_model, backend=counter, fullgraph=True)
    outs = []
    for model, call in ((eager, eager), (compiled_model, fn)):
        logits = call(ids, doc_ids=doc_ids)
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    graphs = counter.graphs
    assert len(graphs) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}
    for op in ("based.taylor_linear_attention_fwd", "based.sliding_window_fwd", "based.short_conv_gated_fwd"):
        assert any(op in t for t in targets), (op, sorted(targets))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_decode_steps_update_the_state_in_place_like_eager():
    """The three decode steps under fullgraph torch.compile (the ops, mutates_args) and in eager mode (their
    bodies): same outputs, and the states updated in place identically."""
    from kernels.short_conv import short_conv_gated_step
    from kernels.sliding_window import sliding_window_step
    from kernels.taylor_linear_attn import taylor_linear_attention_step

    b, h, f, dv, w, c = 2, 2, 4, 8, 3, 12

    def steps(x, state):
        o1 = taylor_linear_attention_step(x["q"], x["k"], x["v"], state["kv"], state["ks"])[0]
        o2 = sliding_window_step(x["q2"], x["k2"], x["v2"], state["kc"], state["vc"], x["pos"])
        o3 = short_conv_gated_step(x["u1"], x["u2"], x["w"], state["conv"])
        return o1, o2, o3

    torch.manual_seed(0)
    nf = 1 + f + f * f
    x = {"q": torch.randn(b, h, f), "k": torch.randn(b, h, f), "v": torch.randn(b, h, dv),
         "q2": torch.randn(b, h, 16), "k2": torch.randn(b, h, 16), "v2": torch.randn(b, h, 16),
         "pos": torch.tensor([0, 4]), "u1": torch.randn(b, c), "u2": torch.randn(b, c), "w": torch.randn(c, 3)}
    x = {key: t.to(DEVICE) for key, t in x.items()}
    state = {"kv": torch.randn(b, h, nf, dv), "ks": 1 + torch.rand(b, h, nf), "kc": torch.randn(b, w, h, 16),
             "vc": torch.randn(b, w, h, 16), "conv": torch.randn(b, c, 3)}
    state = {key: t.to(DEVICE) for key, t in state.items()}
    eager_state = {key: t.clone() for key, t in state.items()}
    before = {key: t.clone() for key, t in state.items()}
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(steps, backend=counter, fullgraph=True)(x, state)
    eager = steps(x, eager_state)
    targets = {str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"}
    for op in ("taylor_linear_attention_step", "sliding_window_step", "short_conv_gated_step"):
        assert any(op in t for t in targets), (op, sorted(targets))
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for key in state:
        torch.testing.assert_close(state[key], eager_state[key], rtol=1e-6, atol=1e-6, msg=key)
        assert not torch.equal(state[key], before[key]), f"{key} was not updated in place"
