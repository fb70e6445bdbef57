"""Programmatic dependent launch (kernels/_pdl.py): where it is on, and that it changes no result.

On the CPU: the switches (off in the interpreter and off CUDA, BASED_PDL, the prefetch rule). On a GPU
(`pytest -m gpu`): a decode block's chain of our kernels in one CUDA graph gives bitwise the same outputs and
states with PDL (and the weights' L2 prefetch) as without, replay after replay.
"""

import pytest
import torch

from kernels import _pdl


def test_pdl_is_off_on_the_cpu_and_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("BASED_PDL", "1")
    assert not _pdl.pdl_enabled(torch.device("cpu"))
    assert _pdl.pdl_options(torch.device("cpu"), "norm") == {"PDL": False}
    assert _pdl.pdl_options(torch.device("cpu"), "linear", prefetch=True) == {"PDL": False, "PREFETCH": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _pdl.pdl_enabled(torch.device("cuda", 0))  # never asks the (absent) device


def test_environment_switches(monkeypatch):
    monkeypatch.setenv("BASED_PDL", "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _pdl.pdl_enabled(torch.device("cuda", 0))
    monkeypatch.delenv("BASED_PDL_PREFETCH", raising=False)
    assert not _pdl.l2_prefetch_enabled()  # measured slower on the H200 (docs/PERFORMANCE.md): off unless asked
    monkeypatch.setenv("BASED_PDL_PREFETCH", "0")
    assert not _pdl.l2_prefetch_enabled()
    monkeypatch.setenv("BASED_PDL_PREFETCH", "1")
    assert _pdl.l2_prefetch_enabled()


def test_groups_from_the_environment(monkeypatch):
    monkeypatch.delenv("BASED_PDL", raising=False)
    assert _pdl._groups() == {"linear", "norm"}  # the mixer step kernels measured slower with PDL
    for value, groups in (("1", set(_pdl.GROUPS)), ("0", set()), ("linear, norm", {"linear", "norm"})):
        monkeypatch.setenv("BASED_PDL", value)
        assert _pdl._groups() == groups
    monkeypatch.setenv("BASED_PDL", "linear,mixers")
    with pytest.raises(ValueError, match="BASED_PDL='linear,mixers': expected 0, 1 or a comma list"):
        _pdl._groups()
    monkeypatch.setenv("BASED_PDL", "norm")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_pdl, "_device_supports", lambda index: True)
    assert _pdl.pdl_enabled(torch.device("cuda", 0), "norm")
    assert not _pdl.pdl_enabled(torch.device("cuda", 0), "linear")


def test_pdl_options_turn_on_the_launch_option_with_the_constant(monkeypatch):
    monkeypatch.setattr(_pdl, "pdl_enabled", lambda device, group: True)
    monkeypatch.setenv("BASED_PDL_PREFETCH", "1")
    assert _pdl.pdl_options(torch.device("cpu"), "norm") == {"PDL": True, "launch_pdl": True}
    assert _pdl.pdl_options(torch.device("cpu"), "linear", prefetch=True) == {"PDL": True, "PREFETCH": True,
                                                                     "launch_pdl": True}
    assert _pdl.pdl_options(torch.device("cpu"), "linear", prefetch=False)["PREFETCH"] is False
    monkeypatch.setenv("BASED_PDL_PREFETCH", "0")
    assert _pdl.pdl_options(torch.device("cpu"), "linear", prefetch=True)["PREFETCH"] is False


def test_bulk_prefetch_needs_16_byte_rows():
    weight = torch.zeros(8, 1792, dtype=torch.bfloat16)
    assert _pdl.bulk_prefetch_ok(weight)
    assert not _pdl.bulk_prefetch_ok(torch.zeros(8, 1681, dtype=torch.bfloat16))  # 3362-byte rows
    assert not _pdl.bulk_prefetch_ok(weight[:, 1:])  # rows start off a 16-byte boundary
    assert not _pdl.bulk_prefetch_ok(weight.t())  # not row-major
    assert _pdl.bulk_prefetch_ok(torch.zeros(4, 8, dtype=torch.float32))


def _block_chain(x, p, state):
    """One decode block's kernels as StaticStep runs them at batch 16: norm, q/k/v product, the linear-attention
    step, out_proj, add + norm, fc1 + gate, fc2; then a short-conv and a sliding-window step on the output."""
    from kernels.decode_linear import decode_linear, decode_swiglu
    from kernels.fused_norm import add_rms_norm
    from kernels.short_conv import short_conv_gated_step
    from kernels.sliding_window import sliding_window_step
    from kernels.taylor_linear_attn import taylor_linear_attention_step

    rows, heads = x.shape[0], 4
    h = add_rms_norm(x, None, p["n1"], eps=1e-5)
    q, k, v = decode_linear(h, p["qkv"], backend="triton").split([64, 64, 256], -1)
    o, _, _ = taylor_linear_attention_step(q.reshape(rows, heads, 16), k.reshape(rows, heads, 16),
                                     v.reshape(rows, heads, 64), state["kv"], state["ks"], backend="triton")
    u = decode_linear(o.reshape(rows, 256), p["out"], backend="triton")
    h2, resid = add_rms_norm(u, x, p["n2"], eps=1e-5, residual_dtype=torch.float32)
    y = decode_linear(decode_swiglu(h2, p["fc1"]), p["fc2"], backend="triton")
    c = short_conv_gated_step(y, y, p["conv"], state["conv"], backend="triton")
    w = sliding_window_step(c.reshape(rows, heads, 64), c.reshape(rows, heads, 64), c.reshape(rows, heads, 64),
                            state["kc"], state["vc"], state["pos"], backend="triton")
    return resid.to(torch.bfloat16) + w.reshape(rows, 256)


def _block_inputs(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device="cuda") * scale).to(torch.bfloat16)  # noqa: E731
    rows, d = 16, 256
    params = {"n1": rnd(d), "n2": rnd(d), "qkv": rnd(384, d, scale=d**-0.5), "out": rnd(d, d, scale=d**-0.5),
              "fc1": rnd(1024, d, scale=d**-0.5), "fc2": rnd(d, 512, scale=512**-0.5), "conv": rnd(d, 4)}
    state = {"kv": torch.zeros(rows, 4, 273, 64, device="cuda"), "ks": torch.zeros(rows, 4, 273, device="cuda"),
             "conv": torch.zeros(rows, d, 4, device="cuda", dtype=torch.bfloat16),
             "kc": torch.zeros(rows, 8, 4, 64, device="cuda", dtype=torch.bfloat16),
             "vc": torch.zeros(rows, 8, 4, 64, device="cuda", dtype=torch.bfloat16),
             "pos": torch.zeros(rows, device="cuda", dtype=torch.int64)}
    return rnd(rows, d), params, state


def _replayed(monkeypatch, pdl: str, replays: int = 5):
    """Outputs after each of `replays` replays of the block chain captured with BASED_PDL=pdl."""
    monkeypatch.setenv("BASED_PDL", pdl)
    x, params, state = _block_inputs(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):  # compile outside the capture, on a copy of the state
        _block_chain(x, params, {k: v.clone() for k, v in state.items()})
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        out = _block_chain(x, params, state)
        state["pos"].add_(1)
    outs = []
    for _ in range(replays):
        graph.replay()
        outs.append((out.clone(), *(v.clone() for v in state.values())))
    torch.cuda.synchronize()
    return outs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_block_chain_in_a_graph_is_bitwise_the_same_with_pdl(monkeypatch):
    if not _pdl._device_supports(torch.cuda.current_device()):
        pytest.skip("PDL needs compute capability 9.0 and a Triton with launch_pdl")
    monkeypatch.setenv("BASED_PDL_PREFETCH", "1")
    with_pdl = _replayed(monkeypatch, "1")
    without = _replayed(monkeypatch, "0")
    for step, (a, b) in enumerate(zip(with_pdl, without, strict=True)):
        for i, (ta, tb) in enumerate(zip(a, b, strict=True)):
            assert torch.equal(ta, tb), f"replay {step}, output {i}: PDL changed a result"
    assert not torch.equal(with_pdl[0][1], with_pdl[-1][1])  # the state moved from replay to replay
