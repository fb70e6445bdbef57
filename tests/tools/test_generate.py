"""Generation with the recurrent step forms: greedy decode == the parallel forward's argmax path; a
left-padded batch == each prompt alone (no pad token reaches the state); sampling; the static KV cache."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_model

from tools import generate as gen
from tools.generate import Sampling, StaticStep, generate, left_pad, static_attention

FAMILIES = ["based", "attn", "mamba"]


def _prompts(vocab=200):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (11, 3, 7)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decode_follows_parallel_argmax(family):
    model = tiny_model(family).double()
    prompt = _prompts()[0]
    out = generate(model, [prompt], 14, keep_logits=True)
    tokens = out.tokens[0]
    full = torch.tensor([prompt + tokens])
    logits = model(full)[0, len(prompt) - 1: -1, :model.cfg.vocab_size]
    assert logits.argmax(-1).tolist() == tokens
    torch.testing.assert_close(out.logits[0], logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_single_runs(family):
    model = tiny_model(family).double()
    prompts = _prompts()
    batch = generate(model, prompts, 9, keep_logits=True, pad_id=5)
    other_pad = generate(model, prompts, 9, pad_id=17)
    assert other_pad.tokens == batch.tokens
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], 9, keep_logits=True)
        assert alone.tokens[0] == batch.tokens[row]
        torch.testing.assert_close(batch.logits[row], alone.logits[0], rtol=1e-9, atol=1e-9)


def test_left_pad_layout():
    ids, docs = left_pad([[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert docs.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_pad([[1, 2], [3, 4]], 0)[1] is None


def test_eos_stops_a_row_and_pads_the_rest():
    model = tiny_model("based").double()
    prompts = _prompts()
    free = generate(model, prompts, 8).tokens
    eos = free[0][2]
    stopped = generate(model, prompts, 8, eos_id=eos).tokens
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    for row in range(3):
        expect = free[row][: free[row].index(eos) + 1] if eos in free[row] else free[row]
        assert stopped[row] == expect


def test_sampling_options():
    model = tiny_model("based")
    prompts = _prompts()
    greedy = generate(model, prompts, 6).tokens
    assert generate(model, prompts, 6, Sampling(temperature=1.0, top_k=1)).tokens == greedy
    assert generate(model, prompts, 6, Sampling(temperature=0.7, top_p=1e-6)).tokens == greedy

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, 6, Sampling(temperature=1.5, top_k=50, top_p=0.9), generator=g).tokens

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_sampling_never_picks_padded_vocab_rows():
    model = tiny_model("attn")  # 200 tokens, 208 rows
    with torch.no_grad():
        model.lm_head.weight[200:] = 50.0  # padding rows would win every argmax
    tokens = generate(model, _prompts(), 5).tokens
    assert max(max(t) for t in tokens) < 200


@pytest.mark.parametrize("family", ["attn", "based"])
def test_static_buffer_step_equals_eager(family, monkeypatch):
    """The CUDA-graph code path (static buffers, preallocated KV cache in buckets) run eagerly on CPU."""
    monkeypatch.setattr(gen, "ATTENTION_BUCKET", 8)
    model = tiny_model(family).double()
    prompts = _prompts()
    ids, docs = left_pad(prompts, 0)
    steps = 21
    _, state = model.prefill(ids, docs)
    tokens = torch.randint(0, 200, (steps, 3), generator=torch.Generator().manual_seed(0))
    eager = []
    for t in range(steps):
        logits, state = model.step(tokens[t], state)
        eager.append(logits)
    _, state = model.prefill(ids, docs)
    with static_attention(model, state, ids.shape[1] + steps) as static_state:
        step = StaticStep(model, static_state, 3, use_graphs=False)
        static = [step(tokens[t]).clone() for t in range(steps)]
    assert not any(type(b.mixer).__name__ == "StaticKVAttention" for b in model.transformer.layers.values())
    torch.testing.assert_close(torch.stack(static), torch.stack(eager), rtol=1e-9, atol=1e-9)


def test_generate_cli(native_runs):
    proc = subprocess.run([sys.executable, "tools/generate.py", "--checkpoint", str(native_runs["based"]),
                           "--prompt", "Alice lives in", "--prompt", "the quick", "--max-new-tokens", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Alice lives in") == 1 and "the quick" in proc.stdout
    assert "tokens/s" in proc.stderr


def test_bench_generation_helpers_on_cpu():
    """bench/generation.py imports without a GPU; its state-traffic count and table work."""
    from bench.generation import _state_rw_bytes, table

    model = tiny_model("based")
    _, state = model.prefill(torch.randint(0, 200, (2, 10)))
    la = state[1]
    expected_la = 2 * (la["kv"].numel() + la["k_sum"].numel()) * 4 // 2
    assert _state_rw_bytes([la], 10, 20) == expected_la
    results = {"args": {"prefill_len": 64},
               "based": {"decode_b1": {"tokens_per_second": 300.0, "ms_per_step": 3.3, "floor_ms_per_step": 1.0},
                         "prefill_b1": {"ms": 2.0, "seconds": 0.002}},
               "attn": {"decode_b1": {"error": "boom"}, "prefill_b1": {"ms": 3.0, "seconds": 0.003}}}
    text = table(results)
    assert "| decode tokens/s, batch 1 | 300 | boom | - |" in text and "1.50x faster" in text
