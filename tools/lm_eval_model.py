"""lm-evaluation-harness model `based_pretrain`: our native checkpoints, exports and published folders.

    python tools/lm_eval_model.py --model based_pretrain --model_args pretrained=RUN_OR_EXPORT \
        --tasks swde,fda,squad_completion --batch_size 8

runs the `lm_eval` command line with this model registered (lm-eval finds models only in imported
modules). From Python: `import tools.lm_eval_model` and then
`lm_eval.simple_evaluate(model="based_pretrain", model_args="pretrained=...")`.

model_args: pretrained (run folder, checkpoint folder, tools/export_hf.py folder or published-format
folder), tokenizer (a tokenizer spec; default: the one the folder names), device (auto; a CUDA device
on a machine without CUDA falls back to the CPU with a warning), dtype (auto:
bfloat16 on CUDA, float32 otherwise), max_length (default: the training sequence length, or 2048),
batch_size, cuda_graph (decode with CUDA graphs; default true on CUDA). What model_args say wins over
lm-eval's `--device` / `--batch_size`.

- loglikelihood / loglikelihood_rolling: one parallel forward per (right-padded) batch.
- generate_until: left-padded batches through tools/generate.py (recurrent decode; pads are their own
  document, so they never reach the state), greedy unless do_sample; stops at EOS, at `max_gen_toks`,
  or when every row holds one of the `until` strings, which are then cut off.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# lm-eval registers its own models lazily, only while the registry is empty: fill it before adding ours
import lm_eval.models  # noqa: E402, F401
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.utils import (  # noqa: E402
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)

from tools.generate import Sampling, continuation_text, generate  # noqa: E402
from tools.model_io import load_model, load_tokenizer_for  # noqa: E402

logger = logging.getLogger(__name__)


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _resolve_device(device: str | None) -> str:
    """auto: CUDA when there is one; a CUDA device on a machine without CUDA falls back to the CPU with a
    warning (lm-eval passes cuda:0 unless told otherwise; its own HF class falls back the same way)."""
    if device in ("auto", None, ""):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("based_pretrain: device %s requested but CUDA is not available here; running on the CPU",
                       device)
        return "cpu"
    return device


@register_model("based_pretrain")
class BasedPretrainLM(TemplateLM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str = "auto", dtype: str = "auto",
                 batch_size: int | str = 8, max_length: int | None = None, cuda_graph: bool | str | None = None,
                 max_batch_size: int | None = None, **kwargs) -> None:
        super().__init__()
        loaded = load_model(pretrained)
        self._device = _resolve_device(device)
        dtype = ("bfloat16" if self._device.startswith("cuda") else "float32") if dtype in ("auto", None) else dtype
        self.model = loaded.model.to(device=self._device, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = load_tokenizer_for(loaded, tokenizer)
        self.vocab_size = self.model.cfg.vocab_size
        self.max_length = int(max_length or loaded.seq_len or 2048)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.cuda_graph = self._device.startswith("cuda") if cuda_graph is None else _flag(cuda_graph)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> BasedPretrainLM:
        """lm-eval's constructor path: `model_args` win over the command line's batch_size / device (which
        lm-eval always passes, device cuda:0 by default), instead of colliding with them."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> BasedPretrainLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def device(self) -> str:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    @torch.inference_mode()
    def _score(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context, continuation) token windows -> (sum log p(continuation), continuation is greedy)."""
        seqs = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in windows]
        length = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), length, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
        logits = self.model(ids.to(self._device))[..., : self.vocab_size].float()
        logprobs = F.log_softmax(logits, dim=-1)
        results = []
        for row, (seq, (_, cont)) in enumerate(zip(seqs, windows, strict=True)):
            n = min(len(cont), len(seq))
            rows = logprobs[row, len(seq) - n: len(seq)]
            target = torch.tensor(cont[-n:], device=rows.device)
            total = rows.gather(-1, target[:, None]).sum().item()
            results.append((total, bool((rows.argmax(-1) == target).all())))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        windows = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]) - len(windows[i][1]))
        out: list[tuple[float, bool] | None] = [None] * len(windows)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            chunk = order[start: start + self.batch_size]
            for i, result in zip(chunk, self._score([windows[i] for i in chunk]), strict=True):
                out[i] = result
                self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1)]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            totals.append(sum(score for score, _ in scored))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start: start + self.batch_size]
                for i, text in zip(chunk, self._generate([requests[i].args[0] for i in chunk], kwargs), strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def _generate(self, contexts: list[str], kwargs: dict) -> list[str]:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_gen_toks", 256))
        sampling = Sampling()
        if _flag(kwargs.get("do_sample", False)):
            sampling = Sampling(float(kwargs.get("temperature", 1.0)), int(kwargs.get("top_k", 0) or 0),
                                float(kwargs.get("top_p", 1.0) or 1.0))
        keep = max(1, self.max_length - max_new)
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-keep:] for c in contexts]

        def stop(rows: list[list[int]]) -> bool:
            return bool(until) and all(any(u in self.tok_decode(r) for u in until) for r in rows)

        result = generate(self.model, prompts, max_new, sampling, eos_id=self.eot_token_id, pad_id=self.eot_token_id,
                          cuda_graph=self.cuda_graph, should_stop=stop)
        texts = []
        for prompt, tokens in zip(prompts, result.tokens, strict=True):
            text = continuation_text(self.tokenizer, prompt, [t for t in tokens if t != self.eot_token_id])
            for u in until:
                text = text.split(u)[0]
            texts.append(text)
        return texts


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
