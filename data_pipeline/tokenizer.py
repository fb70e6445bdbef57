"""Tokenizers behind one small interface, loaded from a spec string, never from the network.

Specs (`load_tokenizer(spec)`):
- `tiktoken:gpt2`: GPT-2's BPE, as the published Based runs used. Loaded offline, in this order,
  from the file named by `TIKTOKEN_GPT2_FILE` (a `.tiktoken` ranks file, i.e. `r50k_base.tiktoken`,
  which holds GPT-2's ranks), or from tiktoken's own cache (`TIKTOKEN_CACHE_DIR`, filled by any earlier
  `tiktoken.get_encoding("gpt2")` on a machine with internet). Other tiktoken names (`tiktoken:cl100k_base`)
  load from the cache only.
- `tiktoken:/path/file.tiktoken`: a ranks file (lines `base64(token) rank`). It gets GPT-2's split pattern
  and `<|endoftext|>` at id `len(ranks)` unless a sidecar `/path/file.tiktoken.json` gives
  `{"pat_str": ..., "special_tokens": {...}, "eos_token": ...}`.
- `sentencepiece:/path/x.model`: a SentencePiece model; its `eos_id` must be set.
- `hf:/path/tokenizer.json`: a Hugging Face `tokenizers` file; the end-of-document token is the first of
  `<|endoftext|>`, `</s>`, `<eos>`, `<|end_of_text|>`, `<|eos|>` that the vocabulary holds.

Every tokenizer has `encode(str) -> list[int]` (special-token text in the input is encoded as plain text),
`decode(list[int]) -> str`, `vocab_size`, `eos_id`, `name` (stable across machines: no folders) and
`vocab_hash` (sha256 of the vocabulary and rules; prepared data records it, and a mismatch is an error).

The tiktoken hash covers what decides the tokens: the ranks, the special tokens, and the pre-tokenization
rule, where known spellings of one rule count as one (GPT-2's pattern is written three ways: the original
release, tiktoken before 0.8, tiktoken since). So tiktoken's cached `gpt2` / `r50k_base` and the
`gpt2.tiktoken` ranks file (openai-whisper ships it) get the same hash. Hashes of the earlier scheme
(the pattern's text) are still accepted by `check_tokenizer`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

from data_pipeline.errors import TokenizerError, TokenizerMismatchError

# GPT-2's pre-tokenization pattern (tiktoken's r50k_pat_str before tiktoken 0.8).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Spellings of one pre-tokenization rule, which split every text identically (tiktoken's comment on
# r50k_pat_str; tests/data/test_data_tokenizer.py checks it on edge cases): the hash uses the rule's name.
PATTERN_RULES = {
    # GPT-2's release (encoder.py), also openai-whisper's tokenizer
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""": "gpt2",
    GPT2_PAT_STR: "gpt2",
    # tiktoken >= 0.8 (possessive quantifiers; what its cached gpt2, r50k_base and p50k_base use)
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""": "gpt2",
}
ENDOFTEXT = "<|endoftext|>"
HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer."""

    name: str
    spec: str
    vocab_size: int
    eos_id: int
    vocab_hash: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class TiktokenTokenizer:
    """A tiktoken `Encoding`; `encode` ignores special tokens written in the text."""

    def __init__(self, encoding, spec: str, name: str, eos_token: str = ENDOFTEXT):
        self.encoding = encoding
        self.spec = spec
        self.name = name
        self.vocab_size = encoding.n_vocab
        if eos_token not in encoding._special_tokens:
            raise TokenizerError(
                f"tokenizer {spec}: no end-of-document token {eos_token!r} in its special tokens"
            )
        self.eos_id = encoding._special_tokens[eos_token]
        self.vocab_hash = _hash_tiktoken(encoding)
        self.accepted_hashes = frozenset({self.vocab_hash, *_legacy_hashes_tiktoken(encoding)})

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model file."""

    def __init__(self, path: str, spec: str):
        import sentencepiece

        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(path)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"tokenizer {spec}: cannot load SentencePiece model {path}: {err}") from err
        self.spec = spec
        self.name = f"sentencepiece:{Path(path).name}"
        self.vocab_size = self.processor.get_piece_size()
        self.eos_id = self.processor.eos_id()
        if self.eos_id < 0:
            raise TokenizerError(
                f"tokenizer {spec}: the SentencePiece model has no EOS piece (eos_id=-1); "
                "train it with eos_id set (for example eos_id=1)"
            )
        self.vocab_hash = hashlib.sha256(self.processor.serialized_model_proto()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file; encodes without added special tokens."""

    def __init__(self, path: str, spec: str):
        import tokenizers

        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as err:
            raise TokenizerError(f"tokenizer {spec}: cannot load {path}: {err}") from err
        self.spec = spec
        self.name = f"hf:{Path(path).name}"
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        eos = next((tok for tok in HF_EOS_CANDIDATES if tok in vocab), None)
        if eos is None:
            raise TokenizerError(
                f"tokenizer {spec}: none of {HF_EOS_CANDIDATES} is in the vocabulary; add an end-of-document token"
            )
        self.eos_id = vocab[eos]
        canonical = json.dumps(json.loads(self.tokenizer.to_str()), sort_keys=True)
        self.vocab_hash = hashlib.sha256(canonical.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer from a spec such as `tiktoken:gpt2` or `sentencepiece:/path/x.model`."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise TokenizerError(
            f"tokenizer spec {spec!r} is not KIND:ARG; use tiktoken:gpt2, tiktoken:/path/file.tiktoken, "
            "sentencepiece:/path/x.model or hf:/path/tokenizer.json"
        )
    if kind == "tiktoken":
        return _load_tiktoken(arg, spec)
    if kind == "sentencepiece":
        _require_file(arg, spec)
        return SentencePieceTokenizer(arg, spec)
    if kind == "hf":
        _require_file(arg, spec)
        return HFTokenizer(arg, spec)
    raise TokenizerError(f"tokenizer spec {spec!r}: unknown kind {kind!r}; use tiktoken, sentencepiece or hf")


def token_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every token id: 'uint16' or 'uint32'."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def check_tokenizer(tokenizer: Tokenizer, expected: dict, where: str) -> None:
    """Raise TokenizerMismatchError unless `tokenizer` has the vocabulary hash recorded in `expected`.

    `expected` is the manifest's "tokenizer" entry; `where` names the manifest for the message. A tokenizer
    may accept more than its own hash (`accepted_hashes`: the same tokenization hashed by an earlier scheme).
    """
    if expected["vocab_hash"] not in getattr(tokenizer, "accepted_hashes", {tokenizer.vocab_hash}):
        raise TokenizerMismatchError(
            f"{where}: tokenizer {tokenizer.spec} ({tokenizer.name}, vocab {tokenizer.vocab_size}, "
            f"hash {tokenizer.vocab_hash[:12]}) is not the one the data was prepared with "
            f"({expected['spec']}, vocab {expected['vocab_size']}, hash {expected['vocab_hash'][:12]}); "
            "use that tokenizer or prepare the data again"
        )


def write_tiktoken_file(path: str | os.PathLike, mergeable_ranks: dict[bytes, int]) -> None:
    """Write ranks in tiktoken's file format (one `base64(token) rank` line per token, by rank)."""
    lines = [
        f"{base64.b64encode(tok).decode()} {rank}\n"
        for tok, rank in sorted(mergeable_ranks.items(), key=_rank)
    ]
    Path(path).write_text("".join(lines))


def _rank(item: tuple[bytes, int]) -> int:
    return item[1]


def _require_file(path: str, spec: str) -> None:
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer {spec}: file {path} does not exist")


def _read_tiktoken_file(path: str, spec: str) -> dict[bytes, int]:
    _require_file(path, spec)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as err:
                raise TokenizerError(
                    f"tokenizer {spec}: {path}:{line_no} is not 'base64(token) rank': {err}"
                ) from err
    if not ranks:
        raise TokenizerError(f"tokenizer {spec}: {path} holds no token")
    return ranks


def _encoding_from_file(path: str, spec: str, name: str):
    import tiktoken

    ranks = _read_tiktoken_file(path, spec)
    options = {"pat_str": GPT2_PAT_STR, "special_tokens": {ENDOFTEXT: len(ranks)}, "eos_token": ENDOFTEXT}
    sidecar = Path(path + ".json")
    if sidecar.is_file():
        options.update(json.loads(sidecar.read_text()))
    encoding = tiktoken.Encoding(
        name=name, pat_str=options["pat_str"], mergeable_ranks=ranks, special_tokens=options["special_tokens"]
    )
    return encoding, options["eos_token"]


def _load_tiktoken(arg: str, spec: str) -> TiktokenTokenizer:
    if "/" in arg or arg.endswith(".tiktoken"):
        encoding, eos = _encoding_from_file(arg, spec, Path(arg).stem)
        return TiktokenTokenizer(encoding, spec, f"tiktoken:{Path(arg).name}", eos)
    gpt2_file = os.environ.get("TIKTOKEN_GPT2_FILE")
    if arg == "gpt2" and gpt2_file:
        encoding, eos = _encoding_from_file(gpt2_file, spec, "gpt2")
        return TiktokenTokenizer(encoding, spec, "tiktoken:gpt2", eos)
    import tiktoken

    try:
        encoding = tiktoken.get_encoding(arg)
    except Exception as err:
        raise TokenizerError(
            f"tokenizer {spec}: tiktoken encoding {arg!r} is not in tiktoken's cache and this machine cannot "
            f"download it ({type(err).__name__}: {err}). Set TIKTOKEN_GPT2_FILE=/path/r50k_base.tiktoken "
            "(GPT-2's ranks), pass tiktoken:/path/file.tiktoken, or copy a filled TIKTOKEN_CACHE_DIR"
        ) from err
    return TiktokenTokenizer(encoding, spec, f"tiktoken:{arg}")


def _hash_tiktoken(encoding) -> str:
    """sha256 of the ranks, the pre-tokenization rule (by name when it is a known spelling) and the
    special tokens: equal for encodings that tokenize every text the same way."""
    digest = _ranks_digest(encoding)
    rule = PATTERN_RULES.get(encoding._pat_str)
    digest.update(b"rule:" + (rule.encode() if rule else b"pattern:" + encoding._pat_str.encode()) + b"\n")
    digest.update(json.dumps(encoding._special_tokens, sort_keys=True).encode())
    return digest.hexdigest()


def _legacy_hashes_tiktoken(encoding) -> list[str]:
    """Hashes of data prepared before the rule names (the pattern's text as written), for this encoding's
    pattern and every other spelling of its rule."""
    rule = PATTERN_RULES.get(encoding._pat_str)
    spellings = [p for p, r in PATTERN_RULES.items() if r == rule] if rule else [encoding._pat_str]
    ranks = _ranks_digest(encoding)
    specials = json.dumps(encoding._special_tokens, sort_keys=True).encode()
    hashes = []
    for pattern in spellings:
        digest = ranks.copy()
        digest.update(pattern.encode())
        digest.update(specials)
        hashes.append(digest.hexdigest())
    return hashes


def _ranks_digest(encoding):
    digest = hashlib.sha256()
    for token, rank in sorted(encoding._mergeable_ranks.items(), key=_rank):
        digest.update(base64.b64encode(token) + b" %d\n" % rank)
    return digest
