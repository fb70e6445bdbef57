"""Write a `tokenizers` tokenizer.json (plus tokenizer_config.json) that reproduces one of our tokenizers.

Our tokenizer specs (`data_pipeline.tokenizer.load_tokenizer`) are tiktoken ranks, SentencePiece models
and Hugging Face tokenizer.json files. `AutoTokenizer` loads the written folder as a fast tokenizer;
`export_tokenizer` checks that it encodes sample text to the same ids as the native tokenizer and raises
`TokenizerExportError` when it does not.

Known difference: our `encode` treats special-token text such as "<|endoftext|>" in the input as plain
text; the Hugging Face tokenizer matches it as the special token.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Alice lives in Oslo; her cat is called Pip.",
    "Numbers: 12 + 30 = 42, 3.14159, 2024-11-22.  Two spaces, a tab\tand a newline\nend.",
    "  leading spaces and trailing ones  ",
    "Mixed CASE words, punctuation!? (parentheses) [brackets] {braces} 'quotes' \"double\".",
)


class TokenizerExportError(RuntimeError):
    """The tokenizer cannot be converted, or the conversion does not reproduce the native encoding."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _from_tiktoken(native) -> Tokenizer:
    encoding = native.encoding
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    byte_map = _bytes_to_unicode()

    def as_str(token: bytes) -> str:
        return "".join(byte_map[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges.extend((rank, left, right) for left, right in pairs)
    merges.sort(key=lambda m: m[0])
    vocab = {as_str(token): rank for token, rank in ranks.items()}
    tok = Tokenizer(models.BPE(vocab, [(as_str(a), as_str(b)) for _, a, b in merges], fuse_unk=False,
                               ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(encoding._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for text, token_id in sorted(encoding._special_tokens.items(), key=lambda kv: kv[1]):
        if tok.get_vocab_size(with_added_tokens=True) != token_id:
            raise TokenizerExportError(f"tiktoken special token {text!r} has id {token_id}, not the next free id "
                                       f"{tok.get_vocab_size(with_added_tokens=True)}; cannot convert")
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
    return tok


def _from_sentencepiece(native) -> Tokenizer:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(native.processor.serialized_model_proto())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.precompiled_charsmap and norm.name not in ("identity", ""):
        precompiled = normalizers.Precompiled(norm.precompiled_charsmap)
    else:
        precompiled = None
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if trainer.model_type == 1:
        model = models.Unigram(pieces, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == 2:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = _spm_merges(vocab, dict(pieces))
        model = models.BPE(vocab, merges, unk_token=trainer.unk_piece, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback)
    else:
        raise TokenizerExportError(f"SentencePiece model type {trainer.model_type} is not supported (unigram or bpe)")
    tok = Tokenizer(model)
    steps = [precompiled] if precompiled is not None else []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    # SentencePiece always adds the dummy-prefix "▁", even before a leading space
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never",
                                                 split=bool(trainer.split_by_whitespace))
    scheme = "always" if norm.add_dummy_prefix else "never"
    steps = [decoders.Metaspace(replacement="▁", prepend_scheme=scheme)]
    if trainer.byte_fallback:
        steps = [decoders.ByteFallback(), decoders.Fuse(), *steps]
    tok.decoder = decoders.Sequence(steps)
    special = [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type == 3]
    tok.add_special_tokens(special)
    user = [AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == 4]
    tok.add_tokens(user)
    return tok


def _spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE model: every split of a piece into two pieces, by the piece's score."""
    merges = []
    for piece, score in scores.items():
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges.extend((score, left, right) for left, right in pairs)
    merges.sort(key=lambda m: (-m[0], len(m[1]), len(m[2])))
    return [(left, right) for _, left, right in merges]


def convert(native) -> Tokenizer:
    """A `tokenizers.Tokenizer` for one of our tokenizer objects."""
    kind = type(native).__name__
    if kind == "TiktokenTokenizer":
        return _from_tiktoken(native)
    if kind == "SentencePieceTokenizer":
        return _from_sentencepiece(native)
    if kind == "HFTokenizer":
        return Tokenizer.from_str(native.tokenizer.to_str())
    raise TokenizerExportError(f"cannot convert a {kind} tokenizer to Hugging Face format")


def check_same_encoding(native, hf_tokenizer, texts: tuple[str, ...] = SAMPLE_TEXTS) -> None:
    """Raise TokenizerExportError unless the Hugging Face tokenizer encodes `texts` as `native` does."""
    for text in texts:
        expected = native.encode(text)
        got = hf_tokenizer.encode(text, add_special_tokens=False)
        got = list(got.ids) if hasattr(got, "ids") else list(got)
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
            raise TokenizerExportError(
                f"the exported tokenizer encodes {text!r} differently from {native.spec}: first difference at token "
                f"{first} (native {expected[first:first + 5]}, exported {got[first:first + 5]})")


def write_tokenizer(native, out_dir: Path, model_max_length: int) -> dict:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the special ids."""
    tok = convert(native)
    check_same_encoding(native, tok)
    tok.save(str(out_dir / "tokenizer.json"))
    eos = tok.id_to_token(native.eos_id)
    if eos is None:
        raise TokenizerExportError(f"{native.spec}: eos id {native.eos_id} has no token in the converted vocabulary")
    specials = {"eos_token": eos, "pad_token": eos}
    unk_id = getattr(getattr(native, "processor", None), "unk_id", lambda: -1)()
    if unk_id >= 0:
        specials["unk_token"] = tok.id_to_token(unk_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "padding_side": "left", "clean_up_tokenization_spaces": False, "add_bos_token": False,
              "add_eos_token": False, "based_pretrain_tokenizer_spec": native.name, **specials}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return {"eos_token_id": native.eos_id, "pad_token_id": native.eos_id}
