"""The throughput bench through the trainer (bench/train_throughput.py --trainer) and the step profile's categories."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.profile_step import CATEGORIES, breakdown, categorize
from bench.train_throughput import read_throughput

ROOT = Path(__file__).resolve().parents[2]


def test_trainer_mode_runs_pretrain_train_and_reads_its_metrics(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "bench/train_throughput.py",
        "--trainer",
        "--archs",
        "based",
        "--config",
        "configs/based_tiny.yaml",
        "--batch",
        "2",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--backend",
        "reference",
        "--data",
        str(tiny_data),
        "--out",
        str(out),
        "--override",
        "model.n_layer=3",
        "--override",
        "model.mixer_layers.sliding_window=[2]",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    # steps 2 and 3 are measured; step 1 (warm-up) is left out
    assert (row["steps_measured"], row["first_step_measured"]) == (2, 2)
    logged = [json.loads(line) for line in Path(row["metrics"]).read_text().splitlines()]
    assert [r["step"] for r in logged if "perf/tokens_per_s_per_device" in r] == [1, 2, 3]
    expected = sorted(r["perf/tokens_per_s_per_device"] for r in logged[1:])
    assert row["tokens_per_s"] == pytest.approx(sum(expected) / 2)
    assert row["overrides"] == ["model.n_layer=3", "model.mixer_layers.sliding_window=[2]"]
    # the run folder (with the trainer's final checkpoint) is gone, the metrics stay
    assert not list(tmp_path.glob("trainer_run_*"))
    assert "based" in proc.stdout and "tokens/s" in proc.stdout


def test_read_throughput_skips_warmup_steps_and_names_the_problem(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {
            "step": s,
            "train/loss": 5.0 - s,
            "perf/tokens_per_s_per_device": tps,
            "perf/mfu": tps / 1e5,
            "perf/peak_memory_bytes": 2**30 * s,
        }
        for s, tps in [(1, 10.0), (2, 100.0), (3, 300.0), (4, 200.0)]
    ]
    rows.insert(2, {"step": 2, "val/loss": 3.0})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_throughput(metrics, skip=1)
    assert (got["steps_measured"], got["tokens_per_s"], got["mfu"]) == (3, 200.0, 200.0 / 1e5)
    assert (got["final_loss"], got["peak_mem_gib"]) == (1.0, 4.0)
    with pytest.raises(RuntimeError, match="no step after the first 4"):
        read_throughput(metrics, skip=4)


KERNELS = {
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "matrix products",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matrix products",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x1_tn_align8>": "matrix products",
    "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>": "matrix products",
    "triton_tem_fused_mm_3": "matrix products",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
    "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}>": "copies/casts",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::BinaryFunctor"
    "<float, float, float, at::native::binary_internal::MulFunctor<float> > >>": "other elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other elementwise",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 3, 128, 1>": "copies/casts",
    "Memset (Device)": "copies/casts",
    "triton_poi_fused__to_copy_7": "copies/casts",
    "triton_poi_fused_add_mul_silu_2": "other elementwise",
    "_swiglu_fwd_kernel": "other elementwise",  # kernels/swiglu: the MLP's gate, one pass each way
    "_swiglu_bwd_kernel": "other elementwise",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>>": "optimizer",
    "void at::native::multi_tensor_apply_kernel<at::native::TensorListMetadata<1>, at::native::"
    "(anonymous namespace)::LpNormFunctor<float, 2, float, float>, float*, int>": "optimizer",
    "_fwd_kernel": "mixer kernels",
    "_bwd_dkdv_kernel": "mixer kernels",
    "_bwd_k3_kernel": "mixer kernels",
    "_bwd_k3_rows_kernel": "mixer kernels",
    "_decode_linear_kernel": "matrix products",
    "_state_pass_kernel": "mixer kernels",
    "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>": "mixer kernels",
    "_rms_norm_fwd_kernel": "norms/reductions",
    "_rms_norm_bwd_kernel": "norms/reductions",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "norms/reductions",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>": "norms/reductions",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, float, float, float, "
    "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>": "loss",
    "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "loss",
    "liger_cross_entropy_kernel": "loss",
    "_ce_stats_kernel": "loss",
    "_ce_grad_kernel": "loss",
    "some_unknown_kernel_name": "other",
}


@pytest.mark.parametrize("name", list(KERNELS), ids=lambda n: n[:40])
def test_categorize_kernel_names(name):
    assert categorize(name) == KERNELS[name]


def test_breakdown_sums_per_step_by_category():
    times_us = {"nvjet_tst_a": 6000.0, "_fwd_kernel": 2000.0, "Memset (Device)": 1000.0, "mystery": 1000.0}
    got = breakdown(times_us, steps=2)
    assert got["total_ms"] == pytest.approx(5.0)
    assert set(got["ms"]) == set(CATEGORIES)
    assert (got["ms"]["matrix products"], got["ms"]["mixer kernels"], got["ms"]["other"]) == (3.0, 1.0, 0.5)
    assert got["kernels"]["copies/casts"] == [("Memset (Device)", 0.5)]


def test_decode_linear_bench_lists_the_published_shapes_and_keeps_only_tiles_that_win():
    """bench/decode_linear.py: the weight shapes come from the 1.3B configs (with their users), and a table
    entry takes the tile that beats cuBLAS by 3% at the most row counts (max_rows), none where no tile does."""
    from bench.decode_linear import table_entry, weight_shapes

    shapes = weight_shapes(["based"])
    assert len(shapes[(1792, 7168, True)]) == 22  # the short-conv in_proj of the 22 base_conv layers
    assert len(shapes[(3584, 1792, False)]) == 36  # every MLP's fc2
    assert (1792, 50264, False) in shapes  # the head, vocabulary padded to a multiple of 8
    assert len(shapes[(1792, 2304, False)]) == 7  # the stacked q, k, v of the 7 linear-attention layers

    def tile(block_n, us):
        return {"block_n": block_n, "block_k": 256, "num_stages": 3, "num_warps": 4, "us": us}

    result = {"rows": {1: {"cublas_us": 10.0, "tiles": [tile(16, 9.0), tile(32, 9.5)]},
                       16: {"cublas_us": 10.0, "tiles": [tile(32, 9.6), tile(16, 9.9)]}}}
    entry = table_entry(result)
    assert (entry["block_n"], entry["max_rows"]) == (32, 16)  # 16 wins only at one row
    result["rows"][16]["tiles"] = [tile(32, 9.8), tile(16, 9.9)]
    entry = table_entry(result)
    assert (entry["block_n"], entry["max_rows"]) == (16, 1)  # both win at one row only: the faster one
    result["rows"][1]["tiles"] = [tile(16, 9.8)]
    assert table_entry(result) is None
