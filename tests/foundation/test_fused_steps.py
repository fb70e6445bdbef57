"""The mixers' fused decode steps (backend "triton": one kernel per token, state updated in place) against
their plain PyTorch steps: same outputs and states after a prefill, across resets, and the same state tensors.

float32; the Triton CPU interpreter where there is no GPU (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import dataclasses

import pytest
import torch

import kernels._common
from based_layers.config import BaseConvConfig, LinearAttnConfig, SlidingWindowConfig
from based_layers.mixers import MIXER_CLASSES

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 24
MIXER_CFGS = {
    "base_conv": BaseConvConfig(expand=4, kernel_size=3),
    "linear_attn": LinearAttnConfig(num_heads=3, feature_dim=4, head_dim=8),
    # window 5 < the 11 decode steps: the ring wraps, before and after the reset
    "sliding_window": SlidingWindowConfig(num_heads=3, window=5),
}
TOL = dict(rtol=1e-5, atol=1e-6)
PROMPT, STEPS = 9, 11
# step index -> rows that start a new document at that token (None: no reset argument)
RESETS = {2: [False, True, False], 3: [False, False, False], 8: [True, False, False]}


@pytest.fixture(autouse=True)
def _nan_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel does not write fails the comparison."""
    monkeypatch.setattr(kernels._common, "FILL_OUTPUTS_WITH_NAN", True)


def _pair(name):
    """(reference mixer, triton mixer) with the same non-trivial float32 weights."""
    torch.manual_seed(0)
    ref = MIXER_CLASSES[name](D, dataclasses.replace(MIXER_CFGS[name], backend="reference"))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tri = MIXER_CLASSES[name](D, dataclasses.replace(MIXER_CFGS[name], backend="triton"))
    tri.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), tri.to(DEVICE)


def _reset(i):
    return None if i not in RESETS else torch.tensor(RESETS[i], device=DEVICE)


@pytest.mark.parametrize("prefill", ["triton", "reference"], ids=["triton-prefill", "reference-prefill"])
@pytest.mark.parametrize("packed_prompt", [False, True], ids=["one-doc", "packed-prompt"])
@pytest.mark.parametrize("name", sorted(MIXER_CFGS))
@torch.no_grad()
def test_fused_steps_equal_reference_steps_in_place(name, packed_prompt, prefill):
    """Prefill (the Triton mixer's own parallel form, or a copy of the reference prefill's state), then
    fused steps with resets against the reference steps; every state tensor is updated where it lies."""
    ref, tri = _pair(name)
    x = torch.randn(3, PROMPT + STEPS, D, device=DEVICE)
    doc_ids = None
    if packed_prompt:  # row 1's prompt holds two documents: the state continues the last one
        doc_ids = torch.zeros(3, PROMPT, dtype=torch.long, device=DEVICE)
        doc_ids[1, 4:] = 1
    _, state_ref = ref(x[:, :PROMPT], doc_ids=doc_ids, return_state=True)
    if prefill == "triton":
        _, state = tri(x[:, :PROMPT], doc_ids=doc_ids, return_state=True)
    else:
        state = {key: t.clone() for key, t in state_ref.items()}
    # on a GPU the Triton prefill kernels multiply fp32 in tf32
    tol = TOL if prefill == "reference" or DEVICE == "cpu" else dict(rtol=5e-3, atol=5e-4)
    tensors = dict(state)
    pointers = {key: t.data_ptr() for key, t in state.items()}
    for i in range(STEPS):
        y_ref, state_ref = ref.step(x[:, PROMPT + i], state_ref, _reset(i))
        y, state = tri.step(x[:, PROMPT + i], state, _reset(i))
        torch.testing.assert_close(y, y_ref, **tol, msg=f"{name}: output of step {i}")
        for key, t in state.items():
            assert t is tensors[key] and t.data_ptr() == pointers[key], f"{name}: state[{key!r}] was replaced"
            torch.testing.assert_close(t, state_ref[key], **tol, msg=f"{name}: state[{key!r}] after step {i}")


@pytest.mark.parametrize("name", sorted(MIXER_CFGS))
@torch.no_grad()
def test_fused_steps_from_empty_state_equal_parallel_form(name):
    """The state layouts that init_state makes are the kernels' layouts; resets follow the packed forward."""
    ref, tri = _pair(name)
    x = torch.randn(2, 14, D, device=DEVICE)
    doc_ids = torch.tensor([[0] * 6 + [1] * 8, [0] * 14], device=DEVICE)
    y_par = ref(x, doc_ids=doc_ids)
    state = tri.init_state(2, torch.device(DEVICE), x.dtype)
    tensors = dict(state)
    for t in range(14):
        reset = (doc_ids[:, t] != doc_ids[:, t - 1]) if t else None
        y, state = tri.step(x[:, t], state, reset)
        torch.testing.assert_close(y, y_par[:, t], **TOL, msg=f"{name}: step {t}")
    assert all(state[key] is tensors[key] for key in state)


@pytest.mark.parametrize("from_prefill", [False, True], ids=["empty-state", "prefill-state"])
@pytest.mark.parametrize("name", sorted(MIXER_CFGS))
def test_step_recorded_by_autograd_uses_the_reference_form(name, from_prefill):
    """The kernels write the state outside autograd: with gradients on, step keeps the differentiable form
    (gradients reach the weights) and returns new state tensors."""
    ref, tri = _pair(name)
    x = torch.randn(2, 6, D, device=DEVICE)

    def start():  # the prefill's state carries gradients too
        if from_prefill:
            return ref(x[:, :5], return_state=True)[1]
        return ref.init_state(2, torch.device(DEVICE), x.dtype)

    state = start()
    y, new_state = tri.step(x[:, 5], state)
    assert y.requires_grad and not any(new_state[key] is state[key] for key in state)
    torch.testing.assert_close(y, ref.step(x[:, 5], start())[0], **TOL)
