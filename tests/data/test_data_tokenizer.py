"""Tokenizer specs load offline, round-trip text, and carry a vocabulary hash."""

from __future__ import annotations

import pytest
from datatest_utils import UNICODE_TEXTS

from data_pipeline.errors import TokenizerError, TokenizerMismatchError
from data_pipeline.tokenizer import check_tokenizer, load_tokenizer, token_dtype


def test_tiktoken_file_round_trip(tiktoken_spec):
    tok = load_tokenizer(tiktoken_spec)
    assert tok.eos_id == tok.vocab_size - 1
    for text in UNICODE_TEXTS:
        ids = tok.encode(text)
        assert tok.eos_id not in ids, "special-token text must be encoded as plain text"
        assert tok.decode(ids) == text


def test_tiktoken_gpt2_from_env_file(tiktoken_spec, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_GPT2_FILE", tiktoken_spec.partition(":")[2])
    tok = load_tokenizer("tiktoken:gpt2")
    assert tok.name == "tiktoken:gpt2"
    assert tok.vocab_hash == load_tokenizer(tiktoken_spec).vocab_hash


def test_sentencepiece_round_trip(sentencepiece_spec):
    tok = load_tokenizer(sentencepiece_spec)
    text = "Alice has a red cat called Pip. Two plus three is five."
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 300 and tok.eos_id == 1


def test_hf_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["the cat sat on the mat"] * 50, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
    assert tok.eos_id == 0
    for text in UNICODE_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_hashes_differ_and_mismatch_is_named(tiktoken_spec, sentencepiece_spec):
    tik, sp = load_tokenizer(tiktoken_spec), load_tokenizer(sentencepiece_spec)
    assert tik.vocab_hash != sp.vocab_hash
    expected = {"spec": tik.spec, "vocab_size": tik.vocab_size, "vocab_hash": tik.vocab_hash}
    check_tokenizer(load_tokenizer(tiktoken_spec), expected, "somewhere/manifest.json")
    with pytest.raises(TokenizerMismatchError, match="somewhere/manifest.json"):
        check_tokenizer(sp, expected, "somewhere/manifest.json")


@pytest.mark.parametrize(
    "spec",
    [
        "sentencepiece:/nonexistent/x.model",
        "hf:/nonexistent/t.json",
        "tiktoken:/nonexistent/x.tiktoken",
        "bpe:/x",
        "gpt2",
    ],
)
def test_bad_specs_name_the_problem(spec):
    with pytest.raises(TokenizerError, match="nonexistent|unknown kind|KIND:ARG"):
        load_tokenizer(spec)


def test_token_dtype():
    assert (
        token_dtype(50257) == "uint16" and token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    )


EDGE_TEXTS = (
    *UNICODE_TEXTS,
    "trailing spaces   ",
    "   leading and   inner   spaces\n\n\n  indented\n\t\ttabs \t mixed",
    "it's they're we've I'm you'll he'd IT'S 'quoted'",
    "numbers 12345 678,90 3.14 and ½ ⅓ ٣",
    "symbols !!! ??? ... --- ()[]{} <|endoftext|>",
    "\n",
    " ",
)


def test_vocab_hash_covers_the_tokenization_not_the_patterns_spelling(tiktoken_spec):
    """Issue 14 item 13: tiktoken's cache builds GPT-2 with the r50k_pat_str of tiktoken >= 0.8, a ranks
    file gets the older spelling; they tokenize alike, so the same ranks must get the same hash."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    from data_pipeline.tokenizer import GPT2_PAT_STR, TiktokenTokenizer

    from_file = load_tokenizer(tiktoken_spec)
    ranks = from_file.encoding._mergeable_ranks
    specials = from_file.encoding._special_tokens
    gpt2_release = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    spellings = [r50k_pat_str, GPT2_PAT_STR, gpt2_release]
    tokenizers = [
        TiktokenTokenizer(
            tiktoken.Encoding(f"gpt2-{i}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials),
            f"spelling-{i}",
            "tiktoken:gpt2",
        )
        for i, pattern in enumerate(spellings)
    ]
    for tok in tokenizers:
        assert tok.vocab_hash == from_file.vocab_hash
        assert [tok.encode(text) for text in EDGE_TEXTS] == [from_file.encode(text) for text in EDGE_TEXTS]
    other_rule = tiktoken.Encoding(
        "other", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens=specials
    )
    assert TiktokenTokenizer(other_rule, "other", "other").vocab_hash != from_file.vocab_hash
    # data prepared with the earlier hash of the same tokenizer is still accepted
    for old_hash in from_file.accepted_hashes:
        legacy = {"spec": tiktoken_spec, "vocab_size": from_file.vocab_size, "vocab_hash": old_hash}
        check_tokenizer(tokenizers[0], legacy, "old/manifest.json")
