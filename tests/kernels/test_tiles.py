"""The per-device, per-shape tile tables (kernels/tiles.py): lookup, fallback, and that the kernels read them."""

import pytest
import torch

from kernels import tiles
from kernels.taylor_linear_attn.plan import Plan


@pytest.fixture
def tables(monkeypatch):
    la = {"H200": {(112, 2048): {"num_warps": 4, "num_stages": 3}, (112, 8192): {"chunk_size": 64}},
          "H100": {}, "default": {(112, 2048): {"block_v": 64, "num_warps": 8}}}
    swa = {"H200": {(128, 64): {"block_m": 128, "bwd": "fused"}}, "H100": {},
           "default": {(128, 64): {"block_n": 32}}}
    monkeypatch.setattr(tiles, "LINEAR_ATTN_TILES", la)
    monkeypatch.setattr(tiles, "SLIDING_WINDOW_TILES", swa)
    monkeypatch.setattr(tiles, "device_kind", lambda device: "H200")
    return la, swa


def test_lookup_picks_the_device_entry_then_default_then_nothing(tables):
    # the H200 entry, with the fields it leaves out taken from "default"
    assert tiles.linear_attn_tiles("cuda", 112, 2048) == {"block_v": 64, "num_warps": 4, "num_stages": 3}
    # T between two entries: the largest T at or below it; above the last: the last
    assert tiles.linear_attn_tiles("cuda", 112, 4096) == {"block_v": 64, "num_warps": 4, "num_stages": 3}
    assert tiles.linear_attn_tiles("cuda", 112, 16384) == {"chunk_size": 64, "block_v": 64, "num_warps": 8}
    # below the smallest T: the smallest
    assert tiles.linear_attn_tiles("cuda", 112, 512) == {"block_v": 64, "num_warps": 4, "num_stages": 3}
    # a Dv without entries: nothing (the Plan's built-in defaults)
    assert tiles.linear_attn_tiles("cuda", 64, 2048) == {}
    # explicit arguments win; None means "not given"
    assert tiles.linear_attn_tiles("cuda", 112, 2048, num_warps=2, block_v=None)["num_warps"] == 2
    assert tiles.sliding_window_tiles("cuda", 128, 64) == {"block_m": 128, "block_n": 32, "bwd": "fused"}
    assert tiles.sliding_window_tiles("cuda", 64, 128) == {}


def test_unknown_device_falls_back_to_default(tables, monkeypatch):
    monkeypatch.setattr(tiles, "device_kind", lambda device: "default")
    assert tiles.linear_attn_tiles("cuda", 112, 2048) == {"block_v": 64, "num_warps": 8}
    assert tiles.sliding_window_tiles("cuda", 128, 64) == {"block_n": 32}


def test_device_kind_of_cpu_is_default():
    assert tiles.device_kind("cpu") == "default"
    assert tiles.device_kind(torch.device("cpu")) == "default"


def test_plan_reads_the_table(tables):
    q, v = torch.zeros(1, 2048, 1, 16, device="meta"), torch.zeros(1, 2048, 1, 112, device="meta")
    plan = Plan.for_call(q, v, [0] * len(tiles.LA_FIELDS))
    assert (plan.BV, plan.num_warps, plan.stages) == (64, 4, {"num_stages": 3})
    # an explicit chunk size (tiles list, in LA_FIELDS order) overrides the table and sets the state count
    plan = Plan.for_call(q, v, [64] + [0] * (len(tiles.LA_FIELDS) - 1))
    assert (plan.BC, plan.NC) == (64, 32)


def test_linear_attention_hands_its_op_the_tiles_it_resolved(tables, monkeypatch):
    """The op receives the table's choice as explicit tiles (explicit arguments over the device entry over
    "default"), so a compiled graph holds the chunk size and feature block its chunk states' shapes depend
    on: a table changed after compiling (a warm inductor cache) once made the op's states disagree with the
    compiled shapes."""
    from kernels.taylor_linear_attn import ops as la_ops

    seen = []

    def record(q, k, v, doc_ids, kv0, ks0, eps, output_final_state, tiles_list):
        seen.append(dict(zip(tiles.LA_FIELDS, tiles_list, strict=True)))
        raise RuntimeError("recorded")

    monkeypatch.setattr(la_ops, "taylor_linear_attention_fwd", record)
    q, v = torch.zeros(1, 8192, 1, 16, device="meta"), torch.zeros(1, 8192, 1, 112, device="meta")
    with pytest.raises(RuntimeError, match="recorded"):
        la_ops.taylor_linear_attention_triton(q, q, v, block_v=32)
    # the feature block (unset everywhere) comes as the built-in default: the states' shape depends on it
    assert seen == [{"chunk_size": 64, "block_f": Plan(8192, 16, 112).BF, "block_v": 32, "block_v_state": 0,
                     "block_v_bwd": 0, "num_warps": 8, "bwd_warps": 0, "num_stages": 0}]


def test_swa_plan_reads_the_table(tables):
    pytest.importorskip("triton")
    from kernels.sliding_window.ops import INT_FIELDS, _plan

    unset = [0] * len(INT_FIELDS)
    plan = _plan(torch.zeros(1, 8, 1, 64, device="meta"), 128, unset, "")
    assert (plan.BM, plan.BN, plan.bwd) == (128, 32, "fused")
    # the dQ kernel's tiles and the backward's stages default to the dK/dV kernel's and the forward's
    assert (plan.BMQ, plan.BNQ, plan.dq_warps, plan.bwd_stages) == (plan.BMB, plan.BNB, plan.bwd_warps, 2)
    assert _plan(torch.zeros(1, 8, 1, 64, device="meta"), 128, unset, "split").bwd == "split"


TABLE_FIELDS = {"LINEAR_ATTN_TILES": tiles.LA_FIELDS, "SLIDING_WINDOW_TILES": tiles.SWA_FIELDS,
                "DECODE_LINEAR_TILES": tiles.DL_FIELDS, "DECODE_SWIGLU_TILES": tiles.DL_FIELDS[:-1]}


@pytest.mark.parametrize("table", sorted(TABLE_FIELDS))
def test_shipped_tables_are_well_formed(table):
    """Every device kind present, keys (int, int), fields the kernels accept, values of the right type."""
    fields = TABLE_FIELDS[table]
    entries = getattr(tiles, table)
    assert set(entries) == set(tiles.DEVICE_KINDS)
    for kind, by_shape in entries.items():
        for key, entry in by_shape.items():
            assert isinstance(key, tuple) and len(key) == 2 and all(isinstance(x, int) for x in key), (kind, key)
            assert set(entry) <= set(fields), (kind, key, entry)
            for name, value in entry.items():
                assert isinstance(value, str) if name == "bwd" else (isinstance(value, int) and value > 0), \
                    (kind, key, name, value)


def test_sweep_output_pastes_into_the_table(tables, monkeypatch, capsys):
    """bench/kernels.py --sweep prints kernels/tiles.py code; run as code it fills the tables the lookup reads."""
    from bench.kernels import print_tiles

    found = {"kind": "H200", "la": {(64, 2048): {"num_warps": 4}, (64, 8192): {"num_stages": 3}},
             "swa": {(128, 64): {"block_m": 128, "block_n": 32, "num_warps": 8}}}
    code = print_tiles(found, "NVIDIA H200")
    assert code in capsys.readouterr().out
    namespace = {"LINEAR_ATTN_TILES": {"H200": {}}, "SLIDING_WINDOW_TILES": {"H200": {}}}
    exec(code, namespace)
    monkeypatch.setattr(tiles, "LINEAR_ATTN_TILES", {**tiles.LINEAR_ATTN_TILES, **namespace["LINEAR_ATTN_TILES"]})
    monkeypatch.setattr(tiles, "SLIDING_WINDOW_TILES",
                        {**tiles.SLIDING_WINDOW_TILES, **namespace["SLIDING_WINDOW_TILES"]})
    assert tiles.linear_attn_tiles("cuda", 64, 4096) == {"num_warps": 4}
    assert tiles.linear_attn_tiles("cuda", 64, 8192) == {"num_stages": 3}
    assert tiles.sliding_window_tiles("cuda", 128, 64) == {"block_m": 128, "block_n": 32, "num_warps": 8}


def test_device_kind_is_a_constant_under_compile(monkeypatch):
    """decode_linear reads its table inside a compiled decode step: the device name query runs once at trace
    time, not traced (Dynamo cannot trace it: a graph break per call, seen on the H200)."""
    import torch._dynamo

    monkeypatch.setattr(torch.cuda, "get_device_name", torch._dynamo.disable(lambda index: "NVIDIA H200"))
    tiles._cuda_kind.cache_clear()
    try:
        @torch.compile(backend="eager", fullgraph=True)
        def scaled(x):
            return x * (2.0 if tiles._cuda_kind(0) == "H200" else 3.0)

        assert scaled(torch.ones(2)).tolist() == [2.0, 2.0]
    finally:
        tiles._cuda_kind.cache_clear()
        torch._dynamo.reset()


def test_compiled_linear_attention_survives_a_table_change(monkeypatch):
    """A table that changes between compiling and running (a new checkout under a warm inductor cache) changes
    no shape inside the compiled graph: before the caller resolved the tiles, inductor's size assert failed
    on the op's chunk states (seen on the H200, reproduced here)."""
    pytest.importorskip("triton")
    import torch._dynamo

    from kernels.taylor_linear_attn.ops import taylor_linear_attention_triton

    table = {"H100": {}, "H200": {}, "default": {(8, 16): {"chunk_size": 16}}}
    monkeypatch.setattr(tiles, "LINEAR_ATTN_TILES", table)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 40, 2, 4, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(1, 40, 2, 8, generator=gen).requires_grad_()
    torch._dynamo.reset()
    try:
        loss = torch.compile(lambda q, k, v: taylor_linear_attention_triton(q, k, v).square().sum())
        before = torch.autograd.grad(loss(q, k, v), (q, k, v))
        table["default"][(8, 16)] = {"chunk_size": 32}
        after = torch.autograd.grad(loss(q, k, v), (q, k, v))
    finally:
        torch._dynamo.reset()
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)
