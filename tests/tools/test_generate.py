"""Generation with the recurrent step forms: greedy decode == the parallel forward's argmax path; a
left-padded batch == each prompt alone (no pad token reaches the state); sampling; the static KV cache."""

import dataclasses
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config, tiny_model

from based_layers import build_model
from based_layers.config import AttentionConfig
from tools import generate as gen
from tools.generate import Sampling, StaticStep, generate, left_pad, static_attention

FAMILIES = ["based", "attn", "mamba"]
# backend "triton" runs on the GPU where there is one, in the Triton CPU interpreter otherwise
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# on a GPU the Triton prefill kernels multiply fp32 in tf32
TRITON_TOL = dict(rtol=1e-4, atol=1e-4) if TRITON_DEVICE == "cpu" else dict(rtol=2e-2, atol=2e-2)


def _eager_steps(model, ids, docs, steps: int):
    """Random tokens [steps, 3] and the logits of model.step on them after a prefill of the left-padded batch."""
    tokens = torch.randint(0, 200, (steps, 3), generator=torch.Generator().manual_seed(0))
    _, state = model.prefill(ids, docs)
    eager = []
    for t in range(steps):
        logits, state = model.step(tokens[t], state)
        eager.append(logits)
    return tokens, eager


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
    tokens, eager = _eager_steps(model, ids, docs, steps)
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


def _based_on_backend(backend: str):
    """The tiny Based model (conv, linear attention, sliding window) in float32 with every mixer on `backend`."""
    cfg = tiny_config("based")
    cfg = dataclasses.replace(cfg, base_conv=dataclasses.replace(cfg.base_conv, backend=backend),
                              linear_attn=dataclasses.replace(cfg.linear_attn, backend=backend),
                              sliding_window=dataclasses.replace(cfg.sliding_window, backend=backend))
    model = build_model(cfg).eval()
    model.load_state_dict(tiny_model("based").state_dict())
    return model.to(TRITON_DEVICE)


def test_generate_with_fused_steps_equals_reference_steps():
    """backend triton: the mixers' steps run the fused kernels (the interpreter on CPU) on the prefill's state."""
    pytest.importorskip("triton")
    prompts = _prompts()
    ref = generate(_based_on_backend("reference"), prompts, 12, keep_logits=True, pad_id=5)
    fused = generate(_based_on_backend("triton"), prompts, 12, keep_logits=True, pad_id=5)
    assert fused.tokens == ref.tokens
    torch.testing.assert_close(fused.logits, ref.logits, **TRITON_TOL)


def test_static_step_with_fused_mixers_updates_in_place_and_warm_up_restores(monkeypatch):
    """The fused steps write the static buffers themselves (StaticStep copies nothing back), and the warm-up
    step before a graph capture leaves the state as it found it (the ring wraps: window 6, 21 steps)."""
    pytest.importorskip("triton")
    model = _based_on_backend("triton")
    ids, docs = left_pad(_prompts(), 0, TRITON_DEVICE)
    tokens = torch.randint(0, 200, (21, 3), generator=torch.Generator().manual_seed(0)).to(TRITON_DEVICE)
    eager = _based_on_backend("reference")
    _, state = eager.prefill(ids, docs)
    expected = []
    for token in tokens:
        logits, state = eager.step(token, state)
        expected.append(logits)
    _, state = model.prefill(ids, docs)
    static_tensors = _flat_ids(state)
    returned = []
    original_step = model.step

    def recording_step(token, layer_states):
        logits, new_state = original_step(token, layer_states)
        returned.append(_flat_ids(new_state))
        return logits, new_state

    monkeypatch.setattr(model, "step", recording_step)
    with torch.inference_mode():
        step = StaticStep(model, state, 3, use_graphs=False)
        static = []
        for token in tokens:
            step.token.copy_(token)
            step._warm_up()  # what every capture runs first; here before every step
            static.append(step(token).clone())
    assert all(ids_ == static_tensors for ids_ in returned)
    torch.testing.assert_close(torch.stack(static), torch.stack(expected), **TRITON_TOL)


def _flat_ids(state):
    return [id(t) for layer in state for _, t in sorted(layer.items())]


@pytest.mark.parametrize("heads", [3, 4], ids=["Dh10-padded-to-16", "Dh8"])
def test_static_kv_cache_padded_head_dim_equals_unpadded(heads, monkeypatch):
    """StaticKVAttention pads the cached head dim to a multiple of 8 (SDPA's efficient kernels); the logits
    equal the unpadded step, and the warm-up before a capture restores everything it changes."""
    monkeypatch.setattr(gen, "ATTENTION_BUCKET", 8)
    cfg = dataclasses.replace(tiny_config("attn"), d_model=10 * heads if heads == 3 else 32,
                              attention=AttentionConfig(num_heads=heads, rotary_fraction=0.5))
    torch.manual_seed(0)
    model = build_model(cfg).double().eval()
    head_dim = cfg.d_model // heads
    ids, docs = left_pad(_prompts(), 0)
    steps = 19
    tokens, eager = _eager_steps(model, ids, docs, steps)
    _, state = model.prefill(ids, docs)
    with static_attention(model, state, ids.shape[1] + steps) as static_state:
        cache = static_state[0]["k"]
        assert cache.shape[-1] == gen.padded_head_dim(head_dim) and cache.shape[-1] % 8 == 0
        step = StaticStep(model, static_state, 3, use_graphs=False)
        static = []
        for t in range(steps):
            step.token.copy_(tokens[t])
            step._warm_up()
            static.append(step(tokens[t]).clone())
        assert not cache[..., head_dim:].any(), "the padding of the KV cache must stay zero"
    torch.testing.assert_close(torch.stack(static), torch.stack(eager), rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_static_kv_attention_runs_sdpa_efficient_kernel_at_head_dim_70():
    """The 1.3B Transformer++ head dim (70): the padded cache lets SDPA use its memory-efficient kernel
    (sdpa_kernel raises when the only allowed backend cannot run), and the output equals the unpadded step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from based_layers.mixers import CausalSelfAttention

    torch.manual_seed(0)
    inner = CausalSelfAttention(280, AttentionConfig(num_heads=4, rotary_fraction=0.5)).cuda().bfloat16().eval()
    mixer = gen.StaticKVAttention(inner)
    x = torch.randn(2, 37, 280, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        _, state = inner(x[:, :36], return_state=True)
        static = gen.StaticKVAttention.from_prefill(state, 64)
        assert static["k"].shape[-1] == 72
        mixer.limit = static["k"].shape[1]
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            y, _ = mixer.step(x[:, 36], static)
        y_ref, _ = inner.step(x[:, 36], state)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)


def test_continuation_keeps_the_space_after_the_prompt(sp_tokenizer):
    """SentencePiece decodes a first piece "▁Oslo" as "Oslo": the continuation is cut from the whole text."""
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(f"sentencepiece:{sp_tokenizer}")
    # the pieces a model continues "Alice lives in" with: "▁Oslo", ".", "▁12"
    prompt, new = tok.encode("Alice lives in"), tok.encode("Oslo. 12")
    assert tok.processor.id_to_piece(new[0]) == "▁Oslo" and tok.decode(new) == "Oslo. 12"
    assert gen.continuation_text(tok, prompt, new) == " Oslo. 12"
    assert gen.continuation_text(tok, prompt, []) == ""


def test_generate_cli_prints_the_whole_sequence_decoded(native_runs, capsys):
    from tools.model_io import load_model, load_tokenizer_for

    prompts = ["Alice lives in", "the quick brown", "her cat is called", "one two"]
    assert gen.main(["--checkpoint", str(native_runs["based"]), "--max-new-tokens", "4", "--device", "cpu",
                     *[arg for p in prompts for arg in ("--prompt", p)]]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("---")]
    loaded = load_model(native_runs["based"])
    tok = load_tokenizer_for(loaded)
    ids = [tok.encode(p) for p in prompts]
    new = generate(loaded.model, ids, 4, eos_id=tok.eos_id, pad_id=tok.eos_id).tokens
    # the model starts some continuation with a word-initial piece "▁x": the case that lost its space
    assert any(tok.processor.id_to_piece(row[0]).startswith("▁") for row in new)
    assert printed == [tok.decode(i + [t for t in n if t != tok.eos_id]) for i, n in zip(ids, new, strict=True)]
