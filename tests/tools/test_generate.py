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


def _model_step_logits(model, ids, docs, tokens) -> torch.Tensor:
    """Logits [steps, B, V] of model.step on tokens [steps, B] after a prefill of ids."""
    with torch.inference_mode():
        _, state = model.prefill(ids, docs)
        eager = []
        for token in tokens:
            logits, state = model.step(token, state)
            eager.append(logits)
    return torch.stack(eager)


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


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_head_in_the_step_continues_from_its_own_token(family, monkeypatch):
    """StaticStep(greedy=True): the step writes its argmax into the token buffer, so calls without a token
    decode greedily on the device alone; the tokens are generate()'s greedy tokens (eager model.step path)."""
    monkeypatch.setattr(gen, "ATTENTION_BUCKET", 8)
    model = tiny_model(family).double()
    prompts = _prompts()
    expected = generate(model, prompts, 12).tokens
    ids, docs = left_pad(prompts, 0)
    logits, state = model.prefill(ids, docs)
    with torch.inference_mode(), static_attention(model, state, ids.shape[1] + 12) as static_state:
        step = StaticStep(model, static_state, 3, use_graphs=False, greedy=True)
        tokens = [logits[:, -1, :200].argmax(-1)]
        step(tokens[0])
        for _ in range(10):
            tokens.append(step.token.clone())
            step()
        tokens.append(step.token.clone())
    assert torch.stack(tokens, 1).tolist() == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_regional_compiled_step_structure_equals_model_step(family, monkeypatch):
    """compile_mode runs embeddings -> each block's step -> head through torch.compile'd regions; traced by
    Dynamo (eager backend: the graph breaks at the KV-cache attention, no inductor) it equals model.step."""
    monkeypatch.setattr(gen, "ATTENTION_BUCKET", 8)
    model = tiny_model(family).double()
    ids, docs = left_pad(_prompts(), 0)
    steps = 10
    tokens, eager = _eager_steps(model, ids, docs, steps)
    _, state = model.prefill(ids, docs)
    with torch.inference_mode(), static_attention(model, state, ids.shape[1] + steps) as static_state:
        step = StaticStep(model, static_state, 3, use_graphs=False, compile_mode="dynamo")
        static = [step(tokens[t]).clone() for t in range(steps)]
    torch.testing.assert_close(torch.stack(static), torch.stack(eager), rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_inductor_compiled_step_greedy_tokens_equal_eager_on_cpu(monkeypatch):
    """The real compile (inductor, CPU C++ backend here) of the attention model's step: same greedy tokens, logits
    within float32 rounding of fused kernels."""
    monkeypatch.setattr(gen, "ATTENTION_BUCKET", 8)
    model = tiny_model("attn")
    prompts = _prompts()
    eager = generate(model, prompts, 10, keep_logits=True)
    ids, docs = left_pad(prompts, 0)
    logits, state = model.prefill(ids, docs)
    with torch.inference_mode(), static_attention(model, state, ids.shape[1] + 10) as static_state:
        step = StaticStep(model, static_state, 3, use_graphs=False, compile_mode="default", greedy=True)
        first = logits[:, -1, :200].argmax(-1)
        outs, tokens = [step(first).clone()], [first]
        for _ in range(8):
            tokens.append(step.token.clone())
            outs.append(step().clone())
        tokens.append(step.token.clone())
    assert torch.stack(tokens, 1).tolist() == eager.tokens
    torch.testing.assert_close(torch.stack(outs, 1)[..., :200], eager.logits[:, 1:], rtol=1e-4, atol=1e-4)


def test_eos_on_the_first_token_ends_the_row_there():
    """Every row finished: generation stops (all-finished is read back every check_every tokens) and each row
    is cut at its eos."""
    model = tiny_model("based").double()
    prompts = _prompts()
    free = generate(model, prompts, 12).tokens
    eos = free[0][0]
    rows = generate(model, [prompts[0]], 12, eos_id=eos, check_every=4).tokens
    assert rows == [[eos]]


def test_mamba_ssm_backend_steps_on_the_pytorch_form_off_gpu():
    """backend mamba_ssm: the in-place mamba-ssm step kernels only run on CUDA; on CPU the step is the PyTorch
    form (same logits as backend reference)."""
    model = tiny_model("mamba").double()
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    _, state = model.prefill(ids)
    token = ids[:, -1]
    ref, _ = model.step(token, [dict(s) for s in state])
    for block in model.transformer.layers.values():
        block.mixer.backend = "mamba_ssm"
    out, _ = model.step(token, state)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _gpu_model(family: str):
    return tiny_model(family).cuda().eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_mode", [None, "default"], ids=["graph", "graph+compile"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_step_greedy_tokens_equal_eager(family, compile_mode):
    """The CUDA-graph decode (static buffers, bucketed KV cache; with compile_mode the torch.compile'd regions
    inside the graph) gives the eager path's greedy tokens (fp32 tiny models, Triton mixers for Based)."""
    model = _gpu_model(family)
    prompts = _prompts()
    eager = generate(model, prompts, 20, keep_logits=True)
    graph = generate(model, prompts, 20, keep_logits=True, cuda_graph=True, compile_mode=compile_mode)
    assert graph.tokens == eager.tokens
    torch.testing.assert_close(graph.logits, eager.logits, rtol=2e-3, atol=2e-3)
    # the benchmarked form: the greedy head inside the graph, one replay per token and no host work
    ids, docs = left_pad(prompts, 0, "cuda")
    with torch.inference_mode():
        logits, state = model.prefill(ids, docs)
        with static_attention(model, state, ids.shape[1] + 20, "triton" if family == "attn" else "sdpa") as st:
            step = StaticStep(model, st, 3, use_graphs=True, compile_mode=compile_mode, greedy=True)
            tokens = [logits[:, -1, :200].argmax(-1)]
            step(tokens[0])
            for _ in range(18):
                tokens.append(step.token.clone())
                step()
            tokens.append(step.token.clone())
    assert torch.stack(tokens, 1).tolist() == eager.tokens


@pytest.mark.parametrize("core", ["triton", "reference"])
def test_static_kv_attention_cores_equal_the_eager_step(core, monkeypatch):
    """StaticKVAttention's split-K decode kernel (and its PyTorch reference) read the padded, bucketed cache in
    place: the logits equal the eager step's (fp32; Triton's interpreter on CPU), left padding included."""
    pytest.importorskip("triton")
    monkeypatch.setattr(gen, "ATTENTION_BUCKET", 8)
    cfg = dataclasses.replace(tiny_config("attn"), d_model=30, attention=AttentionConfig(num_heads=3,
                                                                                          rotary_fraction=0.5))
    torch.manual_seed(0)
    model = build_model(cfg).eval().to(TRITON_DEVICE)
    ids, docs = left_pad(_prompts(), 0, TRITON_DEVICE)
    steps = 11
    tokens = torch.randint(0, 200, (steps, 3), generator=torch.Generator().manual_seed(0)).to(TRITON_DEVICE)
    eager = _model_step_logits(model, ids, docs, tokens)
    with torch.inference_mode():
        _, state = model.prefill(ids, docs)
        with static_attention(model, state, ids.shape[1] + steps, core) as static_state:
            step = StaticStep(model, static_state, 3, use_graphs=False)
            static = [step(token).clone() for token in tokens]
    torch.testing.assert_close(torch.stack(static), eager, rtol=1e-4, atol=1e-4)


def test_compiled_step_on_the_triton_mixers_has_no_graph_break():
    """The Based mixers' fused steps are custom ops (kernels/*/ops.py): Dynamo traces every block of the
    compiled decode step whole (no graph break; Triton's interpreter on CPU) and the step equals the eager one."""
    pytest.importorskip("triton")
    import torch._dynamo

    model = _based_on_backend("triton")
    prompts = _prompts()
    expected = generate(model, prompts, 6, keep_logits=True, pad_id=5)
    ids, docs = left_pad(prompts, 5, TRITON_DEVICE)
    logits, state = model.prefill(ids, docs)
    torch._dynamo.utils.counters.clear()
    with torch.inference_mode(), static_attention(model, state, ids.shape[1] + 6) as static_state:
        step = StaticStep(model, static_state, 3, use_graphs=False, compile_mode="dynamo", greedy=True)
        tokens, outs = [logits[:, -1, :200].argmax(-1)], []
        for t in range(5):
            outs.append(step(tokens[0] if t == 0 else None).clone())
            tokens.append(step.token.clone())
    assert torch.stack(tokens, 1).tolist() == expected.tokens
    torch.testing.assert_close(torch.stack(outs, 1)[..., :200], expected.logits[:, 1:], **TRITON_TOL)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_fused_qkv_stacks_are_kept_per_layer_and_remade_after_a_weight_change():
    """fused_qkv_layers returns the same _FusedQKV per layer (the compiled regions' guards hold across
    StaticSteps), remakes it when load_state_dict changed the weights or model.to() moved them, and keeps no
    model alive."""
    import gc
    import weakref

    model = tiny_model("based")
    first = gen.fused_qkv_layers(model)
    assert first and [f for *_, f in gen.fused_qkv_layers(model)] == [f for *_, f in first]
    changed = ("proj_q.weight", "proj_v.weight")
    model.load_state_dict({k: v + 1 if k.endswith(changed) else v for k, v in model.state_dict().items()})
    second = gen.fused_qkv_layers(model)
    for before, after in zip(first, second, strict=True):
        mixer = after[2]
        assert after[3] is not before[3]
        stacked = torch.cat([mixer.proj_q.weight, mixer.proj_k.weight, mixer.proj_v.weight])
        torch.testing.assert_close(after[3].weight, stacked, rtol=0, atol=0)
    model.to(torch.float64)
    moved = gen.fused_qkv_layers(model)
    assert all(m[3].weight.dtype == torch.float64 and m[3] is not s[3] for m, s in zip(moved, second, strict=True))
    alive = weakref.ref(first[0][2])
    del model, first, second, moved, before, after, mixer
    gc.collect()
    assert alive() is None


def _static_logits(model, ids, docs, tokens, **step_options) -> torch.Tensor:
    """Logits [steps, B, V] of an eager StaticStep through Dynamo's tracing (no graphs) after a prefill."""
    with torch.inference_mode():
        _, state = model.prefill(ids, docs)
        with static_attention(model, state, ids.shape[1] + len(tokens)) as static_state:
            step = StaticStep(model, static_state, ids.shape[0], use_graphs=False, compile_mode="dynamo",
                              **step_options)
            return torch.stack([step(t).clone() for t in tokens])


def test_static_step_runs_listed_linears_on_decode_linear(monkeypatch):
    """StaticStep(fast_linears=True) runs the Linear layers whose shapes kernels/tiles.py lists on decode_linear
    (the Triton kernel: the interpreter on CPU), through Dynamo with no graph break: the same logits as the
    cuBLAS/torch step within bf16 rounding, the kernel launched for every listed layer, and the layers plain
    nn.Linear again after the step."""
    pytest.importorskip("triton")
    import torch._dynamo

    from kernels import tiles
    from kernels.decode_linear import triton_impl

    model = tiny_model("based").to(TRITON_DEVICE, torch.bfloat16)
    listed = {(m.in_features, m.out_features) for m in model.modules() if type(m) is torch.nn.Linear
              and m is not model.lm_head}
    la = [b.mixer for b in model.transformer.layers.values() if type(b.mixer) is gen.LinearAttention]
    assert la
    # the linear-attention layers' q, k, v run as one product (_FusedQKV) of their stacked weights
    listed |= {(m.proj_q.in_features, m.proj_q.out_features + m.proj_k.out_features + m.proj_v.out_features)
               for m in la}
    entry = {"block_n": 16, "block_k": 32, "num_stages": 2, "num_warps": 4, "max_rows": 16}
    monkeypatch.setitem(tiles.DECODE_LINEAR_TILES, tiles.device_kind(TRITON_DEVICE),
                        dict.fromkeys(sorted(listed), entry))
    launches = []
    real = triton_impl.decode_linear_triton
    monkeypatch.setattr(triton_impl, "decode_linear_triton", lambda *a, **k: launches.append(1) or real(*a, **k))
    ids, docs = left_pad(_prompts(), 5, TRITON_DEVICE)
    tokens = torch.randint(0, 200, (4, 3), generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)
    outs = {}
    # every Linear layer but the head on the kernel, each linear-attention layer's three projections as one
    n_linear = sum(1 for m in model.modules() if type(m) is torch.nn.Linear and m is not model.lm_head)
    n_listed = n_linear - 2 * len(la)
    torch._dynamo.utils.counters.clear()
    for fast in (False, True, False):  # each way in one process: the compiled regions must not be shared
        launches.clear()
        outs[fast] = _static_logits(model, ids, docs, tokens, fast_linears=fast, defer_adds=False,
                                    fuse_gate=False).float()
        assert len(launches) == (n_listed * len(tokens) if fast else 0)
        assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert [b.mixer for b in model.transformer.layers.values() if type(b.mixer) is gen.LinearAttention] == la
    torch.testing.assert_close(outs[True], outs[False], rtol=3e-2, atol=3e-2)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_deferred_adds_step_equals_the_plain_step(family, dtype):
    """StaticStep(defer_adds=True) (tools/deferred_adds.py: each block's last residual add inside the next
    block's fused add + RMSNorm) gives the plain step's logits exactly, through Dynamo with no graph break
    (StaticKVAttention's cache read is opaque by design), and model.step's within rounding."""
    import torch._dynamo

    model = tiny_model(family).to(dtype)
    ids, docs = left_pad(_prompts(), 5)
    tokens = torch.randint(0, 200, (4, 3), generator=torch.Generator().manual_seed(1))
    outs = {}
    torch._dynamo.utils.counters.clear()
    for defer in (False, True):
        outs[defer] = _static_logits(model, ids, docs, tokens, fast_linears=True, defer_adds=defer)
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
    breaks = {k: v for k, v in torch._dynamo.utils.counters["graph_break"].items() if "StaticKVAttention" not in k}
    assert not breaks, breaks
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs[True].float(), _model_step_logits(model, ids, docs, tokens).float(), rtol=tol,
                               atol=tol)


def test_set_linears_picks_each_form():
    """The benches' --linears: gated (every decode-step fusion), fused (not the gate), table (no deferred adds
    either), unfused, cublas."""
    saved = (gen.FAST_LINEARS, gen.FUSE_QKV, gen.DEFER_ADDS, gen.FUSE_GATE)
    try:
        expected = {"gated": (True, True, True, True), "fused": (True, True, True, False),
                    "table": (True, True, False, False), "unfused": (True, False, False, False),
                    "cublas": (False, False, False, False)}
        for choice, flags in expected.items():
            gen.set_linears(choice)
            assert (gen.FAST_LINEARS, gen.FUSE_QKV, gen.DEFER_ADDS, gen.FUSE_GATE) == flags, choice
        with pytest.raises(ValueError, match="expected one of"):
            gen.set_linears("fastest")
    finally:
        gen.FAST_LINEARS, gen.FUSE_QKV, gen.DEFER_ADDS, gen.FUSE_GATE = saved


def test_fused_gate_step_runs_fc1_and_the_gate_as_one_kernel(monkeypatch):
    """StaticStep(fuse_gate=True) on a bf16 model: every GatedMLP's fc1 and SwiGLU gate run as decode_swiglu (the
    Triton kernel: the interpreter on CPU), through Dynamo with no graph break; the logits equal the unfused
    step's within bf16 rounding, and the MLPs are back in their blocks after the step."""
    pytest.importorskip("triton")
    import torch._dynamo

    from kernels.decode_linear import triton_impl

    launches = []
    real = triton_impl.decode_swiglu_triton
    monkeypatch.setattr(triton_impl, "decode_swiglu_triton", lambda *a, **k: launches.append(1) or real(*a, **k))
    model = tiny_model("based").to(TRITON_DEVICE, torch.bfloat16)
    mlps = [b.mlp for b in model.transformer.layers.values()]
    ids, docs = left_pad(_prompts(), 5, TRITON_DEVICE)
    tokens = torch.randint(0, 200, (3, 3), generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)
    torch._dynamo.utils.counters.clear()
    outs = {gate: _static_logits(model, ids, docs, tokens, fast_linears=True, fuse_gate=gate).float()
            for gate in (False, True)}
    assert len(launches) == len(mlps) * len(tokens)
    assert [b.mlp for b in model.transformer.layers.values()] == mlps
    torch.testing.assert_close(outs[True], outs[False], rtol=3e-2, atol=3e-2)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def _graph_logits(model, ids, docs, tokens, core: str) -> torch.Tensor:
    """Logits [steps, B, V] of the benchmarked step form: torch.compile'd regions in one CUDA graph per token."""
    with torch.inference_mode():
        _, state = model.prefill(ids, docs)
        with static_attention(model, state, ids.shape[1] + len(tokens), core) as static_state:
            step = StaticStep(model, static_state, ids.shape[0], use_graphs=True, compile_mode="default")
            return torch.stack([step(t).clone() for t in tokens])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_pdl_graph_step_is_bitwise_the_step_without_pdl(family, monkeypatch):
    """kernels/_pdl.py: the bf16 graph step with every Linear on decode_linear and the fused gate gives bitwise
    the same logits with programmatic dependent launch (and the weights' L2 prefetch) as without it."""
    from kernels import _pdl, tiles

    if not _pdl._device_supports(torch.cuda.current_device()):
        pytest.skip("PDL needs compute capability 9.0 and a Triton with launch_pdl")
    model = tiny_model(family).cuda().to(torch.bfloat16).eval()
    listed = {(m.in_features, m.out_features) for m in model.modules() if type(m) is torch.nn.Linear}
    listed |= {(m.proj_q.in_features, m.proj_q.out_features + m.proj_k.out_features + m.proj_v.out_features)
               for m in model.modules() if type(m) is gen.LinearAttention}
    entry = {"block_n": 32, "block_k": 64, "num_stages": 3, "num_warps": 4, "max_rows": 16}
    monkeypatch.setitem(tiles.DECODE_LINEAR_TILES, tiles.device_kind(torch.device("cuda")),
                        dict.fromkeys(sorted(listed), entry))
    ids, docs = left_pad(_prompts(), 5, "cuda")
    tokens = torch.randint(0, 200, (6, 3), generator=torch.Generator().manual_seed(1)).cuda()
    core = "triton" if family == "attn" else "sdpa"
    monkeypatch.setenv("BASED_PDL_PREFETCH", "1")
    outs = {}
    for pdl in ("1", "0"):
        monkeypatch.setenv("BASED_PDL", pdl)
        outs[pdl] = _graph_logits(model, ids, docs, tokens, core)
    assert torch.equal(outs["1"], outs["0"])
