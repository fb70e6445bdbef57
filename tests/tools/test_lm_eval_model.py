"""The lm-eval model `based_pretrain` on small local tasks (no downloads): loglikelihood, rolling, generate_until."""

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TASKS = """
task: tiny_recall_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
---
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
---
task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{context}}}} {{{{answer}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""

DOCS = [
    {"context": "Alice lives in Oslo. Bruno lives in Lima. Alice lives in", "answer": "Oslo",
     "choices": [" Oslo", " Lima", " Cairo"]},
    {"context": "her cat is called Pip. his dog is called Max. her cat is called", "answer": "Pip",
     "choices": [" Pip", " Max"]},
    {"context": "one two three four five six seven", "answer": "eight", "choices": [" eight", " nine", " ten"]},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for i, text in enumerate(TASKS.strip().split("---")):
        (root / f"task{i}.yaml").write_text(text.strip().format(data=data) + "\n")
    return root


def test_simple_evaluate_native_and_export(task_dir, native_runs, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import tools.lm_eval_model  # noqa: F401  (registers based_pretrain)
    from tools.export_hf import export

    manager = TaskManager(include_path=str(task_dir))
    tasks = ["tiny_recall_gen", "tiny_choice", "tiny_rolling"]
    native = lm_eval.simple_evaluate(model="based_pretrain", model_args=f"pretrained={native_runs['based']}",
                                     tasks=tasks, task_manager=manager, batch_size=2, device="cpu")
    res = native["results"]
    assert 0.0 <= res["tiny_recall_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= res["tiny_choice"]["acc,none"] <= 1.0
    assert math.isfinite(res["tiny_rolling"]["word_perplexity,none"])

    out = tmp_path / "export"
    export(native_runs["based"], out)
    exported = lm_eval.simple_evaluate(model="based_pretrain", model_args=f"pretrained={out}", tasks=tasks,
                                       task_manager=manager, batch_size=3, device="cpu")
    for task in tasks:
        for key, value in res[task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert exported["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)


def test_loglikelihood_matches_a_direct_forward(native_runs):
    from tools.lm_eval_model import BasedPretrainLM

    lm = BasedPretrainLM(pretrained=str(native_runs["attn"]), batch_size=3)
    reqs = [((d["context"], c), *lm._encode_pair(d["context"], c)) for d in DOCS for c in d["choices"]]
    batched = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    lm.batch_size = 1
    single = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(batched, single, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    (_, ctx, cont) = reqs[0]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ctx + cont]))[0, :, :lm.vocab_size], -1)
    direct = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
    assert batched[0][0] == pytest.approx(direct, abs=1e-4)


def test_generate_until_batched_equals_single(native_runs):
    from tools.lm_eval_model import BasedPretrainLM

    lm = BasedPretrainLM(pretrained=str(native_runs["mamba"]), batch_size=3)
    contexts = [d["context"] for d in DOCS]
    kwargs = {"until": ["."], "max_gen_toks": 7, "do_sample": False}
    batched = lm._generate(contexts, kwargs)
    assert batched == [lm._generate([c], kwargs)[0] for c in contexts]
    assert all("." not in text for text in batched)


def test_builtin_lm_eval_models_stay_registered():
    from lm_eval.api.registry import get_model

    import tools.lm_eval_model  # noqa: F401

    assert get_model("based_pretrain").__name__ == "BasedPretrainLM"
    assert get_model("dummy").__name__ == "DummyLM"


def test_lm_eval_hf_class_on_an_export(task_dir, native_runs, tmp_path):
    """lm-eval's own `hf` model (AutoModelForCausalLM, trust_remote_code) on an export gives our numbers."""
    pytest.importorskip("accelerate", reason="lm-eval's hf model class needs accelerate")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import tools.lm_eval_model  # noqa: F401
    from tools.export_hf import export

    out = tmp_path / "export"
    export(native_runs["based"], out)
    manager = TaskManager(include_path=str(task_dir))
    tasks = ["tiny_choice", "tiny_rolling"]
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},trust_remote_code=True", tasks=tasks,
                                 task_manager=manager, batch_size=2, device="cpu")
    ours = lm_eval.simple_evaluate(model="based_pretrain", model_args=f"pretrained={out}", tasks=tasks,
                                   task_manager=manager, batch_size=2, device="cpu")
    for task in tasks:
        for key, value in ours["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert hf["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback on a machine without CUDA")
def test_cuda_device_falls_back_to_cpu_without_cuda(native_runs, caplog):
    """lm-eval passes device cuda:0 unless told otherwise; on a CPU-only machine the model runs on the CPU."""
    from tools.lm_eval_model import BasedPretrainLM

    with caplog.at_level("WARNING"):
        lm = BasedPretrainLM(pretrained=str(native_runs["attn"]), device="cuda:0", batch_size=2)
    assert lm.device == "cpu" and next(lm.model.parameters()).device.type == "cpu"
    assert "CUDA is not available" in caplog.text
    assert lm._loglikelihood_tokens([(None, [3, 4, 5], [6])], disable_tqdm=True)[0][0] < 0


def test_device_in_model_args_wins_over_the_command_line(native_runs):
    """`--model_args ...,device=cpu` with lm-eval's own device and batch_size (what simple_evaluate passes)."""
    from tools.lm_eval_model import BasedPretrainLM

    lm = BasedPretrainLM.create_from_arg_string(
        f"pretrained={native_runs['attn']},device=cpu,batch_size=3",
        {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"},
    )
    assert (lm.device, lm.batch_size) == ("cpu", 3)
    lm = BasedPretrainLM.create_from_arg_obj({"pretrained": str(native_runs["attn"])}, {"batch_size": 2, "device": "cpu"})
    assert (lm.device, lm.batch_size) == ("cpu", 2)
