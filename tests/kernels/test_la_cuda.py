"""The CUDA forward of Taylor linear attention (kernels/taylor_linear_attn/cuda).

On the CPU: the build plumbing (nvcc lookup, command, cache key, atomic build, error messages), the input
predicate, a PyTorch statement of the kernel's per-chunk algorithm against the float64 reference, and the kernel
source itself compiled with g++ against emulate.h (a coroutine emulation of the CTA: fragment layouts, index
math, masks, barriers) against the Triton forward and the float64 reference on every output.
On a GPU (`pytest -m gpu`): the real kernel against the Triton forward and the float64 reference.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from kernel_checks import assert_close, rel_err
from la_cuda_checks import F, case_id, check_against_references, make_case, states_reference

from kernels.taylor_linear_attn import cuda as la_cuda
from kernels.taylor_linear_attn import taylor_linear_attention_reference
from kernels.taylor_linear_attn.plan import Plan

# ------------------------------------------------------------------------------------------------------------
# build plumbing (CPU)


def test_build_command_has_the_flags_and_ends_with_the_output(tmp_path):
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    (tmp_path / "cuda" / "lib").mkdir(parents=True)
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("")
    cmd = la_cuda.build_command(nvcc, la_cuda.SOURCE, tmp_path / "out.so")
    assert cmd[0] == str(nvcc) and cmd[-2:] == ["-o", str(tmp_path / "out.so")]
    for flag in ("-O3", "-std=c++17", "-shared", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a"):
        assert flag in cmd
    assert f"-L{(tmp_path / 'cuda' / 'lib').resolve()}" in cmd
    assert str(la_cuda.SOURCE) in cmd


def test_cache_key_changes_with_source_flags_and_compiler():
    key = la_cuda.cache_key("src", ("-O3",), "nvcc 13.0")
    assert key == la_cuda.cache_key("src", ("-O3",), "nvcc 13.0")
    others = {la_cuda.cache_key("src2", ("-O3",), "nvcc 13.0"), la_cuda.cache_key("src", ("-O2",), "nvcc 13.0"),
              la_cuda.cache_key("src", ("-O3",), "nvcc 12.8")}
    assert key not in others and len(others) == 3


def test_missing_nvcc_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="nvcc.*BASED_LA_CUDA=0"):
        la_cuda.find_nvcc()


def test_failed_build_reports_the_compiler_output(tmp_path):
    fail = [sys.executable, "-c", "import sys; sys.stderr.write('based_fwd.cu(1): error: boom'); sys.exit(2)", "x"]
    with pytest.raises(RuntimeError, match="(?s)exit 2.*error: boom"):
        la_cuda.compile_library(fail, tmp_path / "lib.so", "the test library")
    assert list(tmp_path.iterdir()) == [], "a failed build leaves no file behind"


def test_build_lands_atomically_under_the_final_name(tmp_path):
    write = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('ok')", "placeholder"]
    out = la_cuda.compile_library(write, tmp_path / "cache" / "lib.so", "the test library")
    assert out.read_text() == "ok" and [p.name for p in out.parent.iterdir()] == ["lib.so"]


def test_cuda_applies_only_to_cuda_bf16_f16_inputs(monkeypatch):
    q = torch.randn(1, 8, 2, F).bfloat16()
    v = torch.randn(1, 8, 2, 64).bfloat16()
    assert not la_cuda.cuda_applies(q, q, v), "CPU tensors"
    monkeypatch.setenv("BASED_LA_CUDA", "0")
    assert not la_cuda.enabled()
    monkeypatch.setenv("BASED_LA_CUDA", "1")
    assert la_cuda.enabled()


def test_forward_cuda_rejects_what_it_does_not_take():
    q, k, v, docs, _, _ = make_case(1, 8, 1, 64, docs=False, state=False)
    with pytest.raises(ValueError, match="multiple of 64"):
        la_cuda.forward_cuda(q, k, v, docs, 1e-12, None, None, False, Plan(8, F, 64, chunk_size=32), lib=object())
    with pytest.raises(ValueError, match="bf16"):
        la_cuda.forward_cuda(q.float(), k.float(), v.float(), docs, 1e-12, None, None, False, Plan(8, F, 64),
                             lib=object())


# ------------------------------------------------------------------------------------------------------------
# the kernel's algorithm in PyTorch (CPU): same chunks, symmetric features, bf16 rounding points, Gram z


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


def _features(x: torch.Tensor, lay) -> torch.Tensor:
    """[..., 16] fp32 -> symmetric phi [..., NP] fp32, (x_i x_j) coef as the kernels multiply."""
    idx_i, idx_j, coef = (t.cpu() for t in lay.tables)
    ones = torch.ones_like(x[..., :1])
    xe = torch.cat([x, ones], -1)
    xi = xe[..., torch.where(idx_i >= 0, idx_i, F).long()]
    xj = xe[..., torch.where(idx_j >= 0, idx_j, F).long()]
    return (xi * xj) * coef


def kernel_algorithm(q, k, v, docs, kv0, ks0, plan: Plan, eps=1e-12):
    """o [B, T, H, Dv] bf16 and the states (bf16, fp32) as based_fwd.cu computes them, in fp32 PyTorch."""
    from kernels.taylor_linear_attn.triton_impl import layout

    b, t, h, _ = q.shape
    dv = v.shape[-1]
    lay = layout(F, plan.BF, "cpu")
    qf, kf, vf = (x.float().transpose(1, 2).reshape(b * h, t, -1) for x in (q, k, v))
    dd = docs.long().repeat_interleave(h, 0)
    s = torch.zeros(b * h, lay.NP, dv) if kv0 is None else lay.sym(kv0.reshape(b * h, -1, dv))
    z = torch.zeros(b * h, lay.NP) if ks0 is None else lay.sym(ks0.reshape(b * h, -1))
    o = torch.empty(b * h, t, dv)
    states, zst = [], []
    doc_prev = dd[:, 0]
    for c0 in range(0, t, 64):
        if c0 % plan.BC == 0:
            states.append(s.bfloat16())
            zst.append(z.clone())
        sl = slice(c0, min(t, c0 + 64))
        n = sl.stop - c0
        dc, doc_last = dd[:, sl], dd[:, sl.stop - 1]
        carry = (doc_last == doc_prev).float()[:, None, None]
        w = (dc == doc_last[:, None]).float()[..., None]
        phi_q = _features(qf[:, sl], lay)
        phi_k = _bf16(_features(kf[:, sl], lay) * w)
        x = (qf[:, sl] @ kf[:, sl].transpose(1, 2)) * 0.25
        keep = torch.ones(n, n, dtype=torch.bool).tril() & (dc[:, :, None] == dc[:, None, :])
        sim = torch.where(keep, 1.0 + x + 0.5 * x * x, 0.0)
        reads = (dc == doc_prev[:, None])[..., None]
        num = torch.where(reads, _bf16(phi_q) @ _bf16(s), 0.0) + _bf16(sim) @ vf[:, sl]
        den = sim.sum(-1, keepdim=True) + (torch.where(reads, (phi_q * z[:, None]).sum(-1, keepdim=True), 0.0) + eps)
        o[:, sl] = _bf16(num / den)
        gram = phi_k[..., :17].transpose(1, 2) @ phi_k[..., :17]
        dz = torch.zeros_like(z)
        dz[:, :17] = gram[:, 0, :17]
        idx_i, idx_j, coef = (tt.cpu() for tt in lay.tables)
        pairs = torch.arange(17, lay.NS)
        dz[:, pairs] = (4.0 * gram[:, 1 + idx_i[pairs].long(), 1 + idx_j[pairs].long()]) * coef[pairs]
        z = carry[:, :, 0] * z + dz
        s = carry * s + phi_k.transpose(1, 2) @ vf[:, sl]
        doc_prev = doc_last
    o = o.reshape(b, h, t, dv).transpose(1, 2).bfloat16()
    return o, torch.stack(states, 1), torch.stack(zst, 1), (s, z)


@pytest.mark.parametrize("bc", [64, 128], ids=lambda c: f"BC{c}")
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
def test_kernel_algorithm_matches_float64(docs, bc):
    b, t, h, dv = 2, 333, 2, 24
    q, k, v, ids, kv0, ks0 = make_case(b, t, h, dv, docs=docs, state=True)
    plan = Plan(t, F, dv, chunk_size=bc)
    o, states, zst, _ = kernel_algorithm(q, k, v, ids, kv0, ks0, plan)
    o_ref = taylor_linear_attention_reference(q.double(), k.double(), v.double(), doc_ids=ids,
                                              initial_state=(kv0.double(), ks0.double()))
    assert_close("o", o, o_ref, torch.bfloat16)
    from kernels.taylor_linear_attn.triton_impl import layout

    s_ref, z_ref = states_reference(q, k, v, ids, kv0, ks0, bc, layout(F, plan.BF, "cpu"))
    assert_close("states", states, s_ref, torch.bfloat16)
    assert_close("zst", zst, z_ref, torch.float32, scale=50)


# ------------------------------------------------------------------------------------------------------------
# the kernel source on the CPU, through emulate.h


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """based_fwd.cu built with g++ against emulate.h, loaded (skips without g++)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++ to build the kernel's CPU emulation")
    out = tmp_path_factory.mktemp("la_cuda_emu") / "based_fwd_emu.so"
    cmd = [gxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas",
           "-DBASED_LA_EMULATE", "-include", str(la_cuda.EMULATOR_HEADER), "-x", "c++", str(la_cuda.SOURCE), "-o",
           str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return la_cuda.load(out)


def _triton_forward(q, k, v, docs, kv0, ks0, final, plan):
    from kernels.taylor_linear_attn.triton_impl import forward

    return forward(q, k, v, docs, 1e-12, kv0, ks0, final, plan)


EMU_CASES = [
    # (B, T, H, Dv, docs, state, final, BC, warps)
    (2, 63, 3, 64, True, True, True, 128, 4),
    (1, 130, 2, 112, True, False, True, 64, 4),
    (1, 1, 1, 64, False, True, True, 128, 4),
    (1, 129, 1, 40, True, True, False, 128, 2),
]


@pytest.mark.parametrize("case", EMU_CASES, ids=[case_id(*c[:7], c[7]) + f"-W{c[8]}" for c in EMU_CASES])
def test_emulated_kernel_matches_triton_and_float64(emulator, case):
    b, t, h, dv, docs, state, final, bc, warps = case
    q, k, v, ids, kv0, ks0 = make_case(b, t, h, dv, docs=docs, state=state)
    plan = Plan(t, F, dv, chunk_size=bc)
    got = la_cuda.forward_cuda(q, k, v, ids, 1e-12, kv0, ks0, final, plan, warps=warps, lib=emulator)
    check_against_references(got, q, k, v, ids, kv0, ks0, final, plan, _triton_forward(q, k, v, ids, kv0, ks0,
                                                                                        final, plan))


def test_emulated_kernel_matches_its_pytorch_statement(emulator):
    """The CUDA source and kernel_algorithm compute the same thing (fp32 summation order aside)."""
    b, t, h, dv = 1, 200, 2, 48
    q, k, v, ids, kv0, ks0 = make_case(b, t, h, dv, docs=True, state=True, seed=3)
    plan = Plan(t, F, dv, chunk_size=128)
    o, _, (states, zst), final = la_cuda.forward_cuda(q, k, v, ids, 1e-12, kv0, ks0, True, plan, lib=emulator)
    o_a, states_a, zst_a, _ = kernel_algorithm(q, k, v, ids, kv0, ks0, plan)
    assert rel_err(o, o_a) < 1e-3 and rel_err(states, states_a) < 1e-3 and rel_err(zst, zst_a) < 1e-5


def test_emulated_kernel_takes_strided_views_and_int64_docs(emulator):
    b, t, h, dv = 1, 100, 2, 64
    q, k, v, ids, _, _ = make_case(b, t, h, dv, docs=True, state=False, doc_dtype=torch.int64)
    qkv = torch.cat([q, k, v], -1)
    qs, ks, vs = qkv[..., :F], qkv[..., F:2 * F], qkv[..., 2 * F:]
    plan = Plan(t, F, dv)
    got = la_cuda.forward_cuda(qs, ks, vs, ids, 1e-12, None, None, True, plan, lib=emulator)
    check_against_references(got, q, k, v, ids, None, None, True, plan)


def test_emulated_kernel_has_no_order_dependence(emulator, monkeypatch):
    """Threads switch in reverse order: a missing barrier between warps would change the results."""
    b, t, h, dv = 1, 150, 1, 64
    q, k, v, ids, kv0, ks0 = make_case(b, t, h, dv, docs=True, state=True, seed=1)
    plan = Plan(t, F, dv, chunk_size=64)
    runs = []
    for order in ("forward", "reverse"):
        monkeypatch.setenv("BASED_LA_EMU_ORDER", order)
        o, den, (states, zst), final = la_cuda.forward_cuda(q, k, v, ids, 1e-12, kv0, ks0, True, plan, lib=emulator)
        runs.append((o, den, states, zst, *final))
    for a, b_ in zip(*runs, strict=True):
        assert torch.equal(a, b_)


def test_emulated_kernel_skip_masks_are_in_bounds_and_zero_is_the_kernel(emulator):
    """skip=0 is the default call bitwise; every single stage left out (bench/la_cuda.py --stages) runs to the
    end without an emulator range, alignment or deadlock failure (which would abort the process)."""
    b, t, h, dv = 1, 150, 1, 64
    q, k, v, ids, kv0, ks0 = make_case(b, t, h, dv, docs=True, state=True, seed=2)
    plan = Plan(t, F, dv, chunk_size=64)

    def call(**kw):
        o, den, (states, zst), final = la_cuda.forward_cuda(q, k, v, ids, 1e-12, kv0, ks0, True, plan,
                                                            lib=emulator, **kw)
        return o, den, states, zst, *final

    for a, b_ in zip(call(), call(skip=0), strict=True):
        assert torch.equal(a, b_)
    assert sorted(la_cuda.SKIP.values()) == [1 << i for i in range(len(la_cuda.SKIP))]
    skip = la_cuda.SKIP
    groups = (skip["loads"] | skip["output"] | skip["states"],
              skip["features"] | skip["intra"] | skip["readout"] | skip["update"] | skip["normalize"],
              sum(skip.values()))
    for mask in (*skip.values(), *groups):
        call(skip=mask)


@pytest.mark.slow
@pytest.mark.parametrize("dv", [64, 112, 128], ids=lambda d: f"D{d}")
def test_emulated_kernel_longer_sequences(emulator, dv):
    b, t, h = 1, 777, 2
    q, k, v, ids, kv0, ks0 = make_case(b, t, h, dv, docs=True, state=True)
    plan = Plan(t, F, dv)
    got = la_cuda.forward_cuda(q, k, v, ids, 1e-12, kv0, ks0, True, plan, lib=emulator)
    check_against_references(got, q, k, v, ids, kv0, ks0, True, plan)


# ------------------------------------------------------------------------------------------------------------
# GPU: the real kernel

GPU_TS = [1, 63, 64, 777, 2048]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("final", [False, True], ids=["no-final", "final"])
@pytest.mark.parametrize("state", [False, True], ids=["zero", "state"])
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("dv", [64, 112, 128], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("t", GPU_TS, ids=lambda t: f"T{t}")
def test_cuda_forward_matches_triton_and_float64(t, dv, docs, state, final):
    b, h = 2, 3
    q, k, v, ids, kv0, ks0 = make_case(b, t, h, dv, docs=docs, state=state, device="cuda")
    assert la_cuda.cuda_applies(q, k, v)
    from kernels.tiles import LA_FIELDS

    plan = Plan.for_call(q, v, [0] * len(LA_FIELDS))
    got = la_cuda.forward_cuda(q, k, v, ids, 1e-12, kv0, ks0, final, plan)
    check_against_references(got, q, k, v, ids, kv0, ks0, final, plan,
                             _triton_forward(q, k, v, ids, kv0, ks0, final, plan))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("warps,bc", [(2, 128), (4, 64)], ids=["W2-BC128", "W4-BC64"])
def test_cuda_forward_other_tiles(warps, bc):
    b, t, h, dv = 2, 777, 3, 112
    q, k, v, ids, kv0, ks0 = make_case(b, t, h, dv, docs=True, state=True, device="cuda", doc_dtype=torch.int64)
    plan = Plan(t, F, dv, chunk_size=bc)
    got = la_cuda.forward_cuda(q, k, v, ids, 1e-12, kv0, ks0, True, plan, warps=warps)
    check_against_references(got, q, k, v, ids, kv0, ks0, True, plan,
                             _triton_forward(q, k, v, ids, kv0, ks0, True, plan))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_feeds_the_triton_backward():
    """Gradients through forward_cuda's outputs and triton_impl.backward equal those of the Triton forward."""
    from kernels.taylor_linear_attn.triton_impl import backward, forward

    b, t, h, dv = 2, 777, 3, 64
    q, k, v, ids, _, _ = make_case(b, t, h, dv, docs=True, state=False, device="cuda")
    plan = Plan(t, F, dv)
    do = torch.randn_like(v)
    o_c, den_c, states_c, _ = la_cuda.forward_cuda(q, k, v, ids, 1e-12, None, None, False, plan)
    o_t, den_t, states_t, _ = forward(q, k, v, ids, 1e-12, None, None, False, plan)
    got = backward(do, q, k, v, ids, o_c, den_c, states_c, None, False, plan)[:3]
    want = backward(do, q, k, v, ids, o_t, den_t, states_t, None, False, plan)[:3]
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert rel_err(g, w, 1e-1) < 2e-2, name


# ------------------------------------------------------------------------------------------------------------
# the dispatch: which forward taylor_linear_attention runs


def test_forward_backend_is_cuda_only_at_the_measured_shapes(monkeypatch):
    from kernels import tiles

    assert tiles.la_forward_backend("cpu", 64, 2048, 256) == "triton"  # "default" lists none
    monkeypatch.setattr(tiles, "device_kind", lambda device: "H200")
    for shape in ((64, 2048, 256), (112, 2048, 128)):  # TK's shape; the 1.3B runs' micro batch
        assert tiles.la_forward_backend("cuda", *shape) == "cuda", shape
    for shape in ((64, 2048, 128), (64, 4096, 256), (112, 2048, 64), (112, 8192, 64)):
        assert tiles.la_forward_backend("cuda", *shape) == "triton", shape


def test_unbuildable_library_warns_once_and_leaves_the_triton_forward(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(la_cuda, "_UNAVAILABLE", [])
    la_cuda.library.cache_clear()
    with pytest.warns(RuntimeWarning, match="(?s)nvcc, which was not found.*The Triton forward runs instead"):
        assert not la_cuda.available()
    assert not la_cuda.available()  # no second build attempt, no second warning
    la_cuda.library.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_listed_shape_runs_the_cuda_forward_inside_the_op(monkeypatch):
    """At a shape LA_FORWARD_CUDA lists, taylor_linear_attention's op runs forward_cuda (its output bitwise);
    with BASED_LA_CUDA=0 the Triton forward, whose output and gradients agree within bf16 rounding."""
    from kernels import tiles
    from kernels.taylor_linear_attn import taylor_linear_attention

    b, t, h, dv = 2, 256, 4, 64
    monkeypatch.setitem(tiles.LA_FORWARD_CUDA, tiles.device_kind("cuda"), {(dv, t, b * h)})
    q, k, v, ids, _, _ = make_case(b, t, h, dv, docs=True, state=False, device="cuda")
    plan = Plan.for_call(q, v, [0] * len(tiles.LA_FIELDS))
    direct = la_cuda.forward_cuda(q, k, v, ids, 1e-12, None, None, False, plan)[0]
    grads, outs = {}, {}
    for flag in ("1", "0"):
        monkeypatch.setenv("BASED_LA_CUDA", flag)
        leaves_ = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        outs[flag] = taylor_linear_attention(*leaves_, doc_ids=ids, backend="triton")
        grads[flag] = torch.autograd.grad(outs[flag].float().square().sum(), leaves_)
    assert torch.equal(outs["1"], direct)
    assert rel_err(outs["0"], outs["1"], 1e-1) < 2e-2
    for name, g1, g0 in zip(("dq", "dk", "dv"), grads["1"], grads["0"], strict=True):
        assert rel_err(g1, g0, 1e-1) < 2e-2, name
