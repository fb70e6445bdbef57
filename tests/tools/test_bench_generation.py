"""bench/generation.py's CPU-side parts: the synthetic decode states, the bandwidth floor's byte counts, the
'most sequences' search, the 24x answer and the summary table."""

import pytest
import torch
from conftest import tiny_model

from bench import generation as bench
from tools.generate import StaticStep, static_attention


def _bytes(state):
    """Bytes of the per-sequence tensors (not the attention cache's shared `length` scalar)."""
    return sum(t.numel() * t.element_size() for layer in state for t in layer.values() if t.dim())


@pytest.mark.parametrize("family", ["based", "attn", "mamba"])
def test_state_template_builds_decodable_states_of_any_batch_and_context(family):
    model = tiny_model(family)
    template = bench.StateTemplate(model, fill_len=9)
    batch, context, steps = 3, 40, 5
    state = template.build(batch, context, steps)
    assert _bytes(state) == batch * template.bytes_per_seq(context, steps)
    for block, layer in zip(model.transformer.layers.values(), state, strict=True):
        assert all(t.shape[0] == batch for t in layer.values() if t.dim())
        if "length" in layer:  # attention: `context` random cached tokens, zeros beyond
            head_dim = block.mixer.head_dim
            assert int(layer["length"]) == context and layer["next"].tolist() == [context] * batch
            assert layer["valid"].sum(1).tolist() == [context] * batch
            assert layer["k"][:, :context, :, :head_dim].abs().sum() > 0
            assert not layer["k"][:, context:].any() and not layer["k"][..., head_dim:].any()
            assert layer["k"].shape[1] % bench.ATTENTION_BUCKET == 0 and layer["k"].shape[1] > context + steps
        if "pos" in layer:  # sliding window: the prefill's ring, moved on to position `context`
            assert layer["next"].tolist() == [context] * batch and int(layer["pos"].max()) == context - 1
    with torch.inference_mode(), static_attention(model, state, context + steps) as static_state:
        step = StaticStep(model, static_state, batch, use_graphs=False, greedy=True)
        logits = step(torch.zeros(batch, dtype=torch.long))
        for _ in range(steps - 1):
            logits = step()
    assert torch.isfinite(logits).all()


def test_state_traffic_counts_what_a_step_reads_and_writes():
    attn = tiny_model("attn")
    state = bench.StateTemplate(attn, fill_len=4).build(2, 30, 10)
    heads, head_dim = 4, 8  # d 32, 4 heads; float32
    per_token = 2 * heads * head_dim * 4
    assert bench.state_traffic_per_seq(attn, state, 30, 10) == int(2 * per_token * (30 + 10 / 2 + 1))
    based = tiny_model("based")
    state = bench.StateTemplate(based, fill_len=12).build(2, 50, 4)
    conv, la, swa = state[0], state[1], state[2]
    expected = 2 * 2 * conv["conv"].numel() * 4 // 2  # two conv layers, read + write
    expected += 2 * (la["kv"].numel() + la["k_sum"].numel()) * 4 // 2
    expected += (swa["k"].numel() + swa["v"].numel()) * 4 // 2  # the ring is read; one slot written
    assert bench.state_traffic_per_seq(based, state, 50, 4) == expected


def test_weight_bytes_count_a_tied_embedding_once():
    model = tiny_model("based")
    assert bench.weight_bytes_per_step(model) == sum(p.numel() * 4 for p in model.parameters())


def test_search_max_bisects_to_the_largest_fitting_batch():
    limit = 1234
    calls = []

    def check(batch):
        calls.append(batch)
        return (batch <= limit, "" if batch <= limit else "OOM")

    assert bench.search_max(1000, 128, 5, check)[0] == 1000 and calls == [1000]  # the prediction held
    calls.clear()
    found, checked = bench.search_max(2000, 128, 12, check)
    assert (
        limit * 0.99 <= found <= limit
        and len(checked) <= 12
        and checked[0] == {"batch": 2000, "fits": False, "why": "OOM"}
    )
    calls.clear()
    assert (
        bench.search_max(2000, 128, 2, check)[0] == 1064
    )  # two tries: OOM at 2000, then (128 + 2000) // 2 fits
    found, checked = bench.search_max(500, 128, 5, lambda b: (False, "RuntimeError: grid too large"))
    assert found == 128 and len(checked) == 1  # not an OOM: no bisection


def _entry(tps, ms, floor, peak=1.0, batch=1):
    return {
        "tokens_per_second": tps,
        "ms_per_step": ms,
        "floor_ms_per_step": floor,
        "step_over_floor": ms / floor,
        "peak_memory_gib": peak,
        "batch": batch,
    }


def test_claim_24x_and_table():
    results = {
        "args": {"prefill_len": 4096},
        "based": {
            "decode_c1024_b128": _entry(50000, 2.5, 1.7, batch=128),
            "decode_c16384_b16": _entry(20000, 0.8, 0.7, batch=16),
            "decode_c16384_b64": _entry(30000, 2.1, 1.2, batch=64),
            "decode_c16384_b128": {"skipped": "time budget (--budget-s) spent"},
            "max_sequences_c1024": {
                "context": 1024,
                "predicted": 8000,
                "verified": 7900,
                "per_seq_mib": 17.2,
                "same_at_every_context": "constant",
            },
            "decode_max_c1024": _entry(100000, 60.0, 55.0, batch=7900) | {"context": 1024},
            "prefill_b1": {"ms": 30.0, "seconds": 0.03},
            "prefill_graph_b1": {"ms": 20.0, "seconds": 0.02},
        },
        "attn": {
            "decode_c1024_b128": _entry(12000, 10.7, 7.5, batch=128),
            "decode_c16384_b16": _entry(1000, 16.0, 15.9, batch=16),
            "decode_c16384_b64": {"skipped": "does not fit", "batch": 64, "context": 16384},
            "sdpa_c16384_b16": _entry(500, 32.0, 15.9, batch=16) | {"context": 16384},
            "prefill_b1": {"ms": 54.0, "seconds": 0.054},
            "prefill_graph_b1": {"ms": 40.0, "seconds": 0.04},
        },
    }
    claim = bench.claim_24x(results)
    assert "not reached at the same batch: at most 20.0x (cache 16384, batch 16" in claim["answer"]
    assert "c16384_b64" in claim["answer"]
    # per GPU at 16k: Based at its most sequences (constant state) 100,000 tok/s vs Transformer++'s best 1,000
    assert (
        "per GPU" in claim["answer"]
        and "Based batch 7900 vs Transformer++ batch 16 (100.0x)" in claim["answer"]
    )
    results["claim_24x"] = claim
    text = bench.table(results)
    assert "| 16384 | 64 | 30,000 tok/s, 2.10 ms (1.75x floor 1.20), 1.0 GiB | does not fit | - |" in text
    assert "| 1024 | 128 |" in text and "4.17x |" in text
    assert "| 16384 | 128 | skipped (time budget) | - | - |" in text  # not told as "does not fit"
    assert "| Based | 1024 (every cache length) | 8,000 | 7,900 | 17.2 | 100,000 tok/s" in text
    assert "prefill batch 1 x 4096: Based 30.0 ms, Transformer++ 54.0 ms (1.80x faster)" in text
    assert "prefill (CUDA graph) batch 1 x 4096: Based 20.0 ms, Transformer++ 40.0 ms (2.00x faster)" in text
    assert "1.80x faster" in text and text.splitlines()[-1].startswith("24x: ")
    assert "cache 16384 batch 16: split-K kernel 16.00 ms/step, SDPA 32.00 ms/step" in text


def test_quick_args():
    args = bench.parse_args(["--quick", "--models", "based,attn"])
    assert args.batches == [1, 16] and args.contexts == [1024, 16384] and args.steps == 32
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "rwkv"])


def test_divergences_compare_the_first_differing_step_only():
    """The graph check's near-tie test: a row's first differing token is a near-tie when eager's top-2 margin
    there is below twice the paths' usual logit difference (over the steps both saw the same tokens)."""
    eager_logits = torch.zeros(3, 4, 5)
    fast_logits = eager_logits.clone()
    fast_logits[2, :, 4] = 0.02  # the usual difference, on a row that never differs
    eager_logits[0, 1, :2] = torch.tensor([1.00, 0.99])  # margin 0.01 < 2 x 0.02
    fast_logits[0, 1, :2] = torch.tensor([0.99, 1.00])  # a near-tie flipped
    eager_logits[1, 2, :2] = torch.tensor([3.0, 1.0])  # margin 2: no usual error flips that
    fast_logits[1, 2, :2] = torch.tensor([1.0, 3.1])
    fast_logits[1, 3] = 100.0  # after the first difference: ignored
    eager_tokens = [[0, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]]
    fast_tokens = [[0, 1, 4, 4], [0, 0, 1, 0], [1, 2, 3, 4]]
    report = bench.divergences(eager_tokens, fast_tokens, eager_logits, fast_logits)
    assert report["rows_equal"] == 1
    assert report["usual_logit_diff"] == pytest.approx(0.02)
    first = {r["row"]: r for r in report["first_divergences"]}
    assert sorted(first) == [0, 1] and first[0]["step"] == 1 and first[1]["step"] == 2
    assert first[0]["near_tie"] and not first[1]["near_tie"]
    assert first[1]["logit_max_diff"] == pytest.approx(2.1)
    assert report["all_divergences_near_ties"] is False
    same = bench.divergences(eager_tokens[:1], eager_tokens[:1], eager_logits[:1], eager_logits[:1])
    assert same["rows_equal"] == 1 and same["first_divergences"] == [] and same["all_divergences_near_ties"]
