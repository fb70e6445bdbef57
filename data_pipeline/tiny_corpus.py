"""`python -m data_pipeline.tiny_corpus --out DIR`: a small, deterministic, English-like training set.

Writes DIR/source/tiny_corpus.jsonl.zst (Pile format), trains DIR/tokenizer.model (SentencePiece BPE,
vocab 512, one thread: reproducible), then prepares DIR (train + val shards, manifest.json). `--no-zstd`
writes the same lines as plain DIR/source/tiny_corpus.jsonl (for a machine without the zstandard package,
such as a GPU box that receives only some wheels): the same documents, tokens and samples.

Documents come from a fixed grammar driven by splitmix64 on Python ints, so the text is identical on
every machine and Python >= 3.10. They have structure a tiny LM learns quickly (agreement, counting,
sums) and facts stated early and asked for at the end (associative recall), so the loss visibly falls.
The defaults take a few seconds on one core; `make pretrain` and the trainer's golden-loss test use them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

from data_pipeline.errors import DataError, PrepareStateError
from data_pipeline.manifest import MANIFEST, write_json_atomic
from data_pipeline.order import MASK64, splitmix64
from data_pipeline.prepare import PrepareConfig, prepare

NAMES = tuple(
    "Alice Bruno Chen Dana Emil Farah Gus Hana Ivan Jade Kofi Lena Mateo Nora Omar Pia Quinn Rosa Sami Tara Umar Vera Wes Yara".split()
)
CITIES = tuple("Oslo Lima Cairo Perth Quito Riga Seoul Tunis Dakar Hanoi Porto Minsk".split())
JOBS = tuple("baker teacher pilot doctor farmer painter driver singer nurse miner".split())
COLORS = tuple("red blue green yellow black white brown gray orange purple".split())
ANIMALS = tuple("cat dog horse rabbit parrot goat turtle fox owl duck".split())
PETS = tuple("Pip Max Luna Bean Sky Rex Momo Taco Juno Ziggy Olive Basil".split())
NOUNS = tuple(
    (noun, noun + "s")
    for noun in "tree river house book boat garden bridge window road hill lamp table".split()
)
ADJECTIVES = tuple("old small tall quiet bright cold warm long busy empty wide new".split())
VERBS = tuple(
    (verb + "es" if verb.endswith("ch") else verb + "s", verb)
    for verb in "see find paint like visit clean build watch".split()
)
PREPOSITIONS = tuple("near behind under above beside across".split())
DAYS = tuple("Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split())
NUMBERS = tuple("zero one two three four five six seven eight nine ten eleven twelve".split())
VOCAB_SIZE = 512
SOURCE = "source/tiny_corpus.jsonl.zst"
PLAIN_SOURCE = "source/tiny_corpus.jsonl"
TOKENIZER = "tokenizer.model"
RECIPE = "tiny_corpus.json"


class Rng:
    """splitmix64 on Python ints: the same stream on every platform and Python version."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def below(self, n: int) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        return splitmix64(self.state) % n

    def pick(self, options: tuple):
        return options[self.below(len(options))]


def _sentence(rng: Rng, person: dict) -> str:
    kind = rng.below(6)
    name, pet = person["name"], person["pet"]
    if kind == 0:
        return f"Every {rng.pick(DAYS)}, {name} walks to the {rng.pick(NOUNS)[0]} with {pet}."
    if kind == 1:
        plural = rng.below(2)
        first, second = rng.pick(NOUNS)[plural], rng.pick(NOUNS)[plural]
        verb = "are" if plural else "is"
        return f"The {rng.pick(ADJECTIVES)} {first} {verb} {rng.pick(PREPOSITIONS)} the {second}."
    if kind == 2:
        plural = rng.below(2)
        subject = f"The {rng.pick(ANIMALS)}s" if plural else rng.pick((name, pet))
        return f"{subject} {rng.pick(VERBS)[plural]} the {rng.pick(ADJECTIVES)} {rng.pick(NOUNS)[plural]}."
    if kind == 3:
        start = rng.below(8)
        stop = start + 2 + rng.below(4)
        return (
            f"{name} counts from {NUMBERS[start]} to {NUMBERS[stop]}: "
            + ", ".join(NUMBERS[start : stop + 1])
            + "."
        )
    if kind == 4:
        a = rng.below(7)
        b = rng.below(13 - a)
        return f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."
    return f"{pet} is {rng.pick(PREPOSITIONS)} the {rng.pick(NOUNS)[0]} in {person['city']}."


def _questions(rng: Rng, person: dict) -> list[str]:
    name, pet = person["name"], person["pet"]
    questions = [
        f"Where does {name} live? {name} lives in {person['city']}.",
        f"What is {pet}? {pet} is a {person['color']} {person['animal']}.",
        f"What does {name} do? {name} is a {person['job']}.",
    ]
    first = rng.below(3)
    return [questions[(first + i) % 3] for i in range(1 + rng.below(3))]


def document(rng: Rng) -> str:
    """One document: facts about a person, sentences of a small grammar, then questions on the facts."""
    person = {
        "name": rng.pick(NAMES),
        "city": rng.pick(CITIES),
        "job": rng.pick(JOBS),
        "color": rng.pick(COLORS),
        "animal": rng.pick(ANIMALS),
        "pet": rng.pick(PETS),
    }
    sentences = [
        f"{person['name']} is a {person['job']} who lives in {person['city']}.",
        f"{person['name']} has a {person['color']} {person['animal']} called {person['pet']}.",
    ]
    sentences += [_sentence(rng, person) for _ in range(2 + rng.below(7))]
    return " ".join(sentences + _questions(rng, person))


def generate_documents(count: int, seed: int = 0) -> list[str]:
    """`count` documents, a pure function of (count, seed)."""
    rng = Rng(splitmix64(seed))
    return [document(rng) for _ in range(count)]


def _pile_lines(texts: list[str]) -> bytes:
    return "".join(
        json.dumps({"text": text, "meta": {"pile_set_name": "tiny_corpus", "index": i}}) + "\n"
        for i, text in enumerate(texts)
    ).encode()


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def write_jsonl_zst(path: str, texts: list[str]) -> None:
    """Write texts in the Pile's format: zstd-compressed lines of {"text": ..., "meta": {...}}."""
    import zstandard

    _write_atomic(path, zstandard.ZstdCompressor(level=3, threads=0).compress(_pile_lines(texts)))


def write_jsonl(path: str, texts: list[str]) -> None:
    """The same lines as `write_jsonl_zst`, uncompressed."""
    _write_atomic(path, _pile_lines(texts))


def zstd_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("zstandard") is not None


def train_sentencepiece(path: str, texts: list[str], vocab_size: int = VOCAB_SIZE) -> None:
    """Train a reproducible SentencePiece BPE model (one thread, identity normalization, EOS id 1)."""
    import sentencepiece

    sentences = [sentence + "." for text in texts for sentence in text.split(". ") if sentence]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        num_threads=1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=-1,
        eos_id=1,
        pad_id=-1,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(model.getvalue())
    os.replace(path + ".tmp", path)


def make_tiny_corpus(
    out: str,
    docs: int = 4000,
    seed: int = 0,
    seq_len: int = 256,
    val_docs: int | None = None,
    shard_samples: int = 256,
    workers: int = 1,
    progress: bool = False,
    zstd: bool = True,
) -> dict:
    """Write the corpus and tokenizer into `out` and prepare it; return the manifest.

    The first `val_docs` documents (default docs // 20) form the validation split. A folder already made
    with the same arguments is returned as it is; one made with others is an error (nothing is touched).
    `zstd=False` writes the source uncompressed (the recipe records it; the samples are the same).
    """
    val_docs = max(1, docs // 20) if val_docs is None else val_docs
    recipe = {
        "docs": docs,
        "seed": seed,
        "seq_len": seq_len,
        "val_docs": val_docs,
        "shard_samples": shard_samples,
    }
    if not zstd:  # only then, so that folders made before this option keep their recipe
        recipe["zstd"] = False
    recipe_path, manifest_path = os.path.join(out, RECIPE), os.path.join(out, MANIFEST)
    if os.path.exists(recipe_path):
        with open(recipe_path) as f:
            existing = json.load(f)
        if existing != recipe:
            raise PrepareStateError(
                f"{out} holds a tiny corpus made with {existing}, not {recipe}; delete it first"
            )
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                return json.load(f)
    texts = generate_documents(docs, seed)
    source, tokenizer = os.path.join(out, SOURCE if zstd else PLAIN_SOURCE), os.path.abspath(os.path.join(out, TOKENIZER))
    (write_jsonl_zst if zstd else write_jsonl)(source, texts)
    train_sentencepiece(tokenizer, texts)
    write_json_atomic(recipe_path, recipe)
    config = PrepareConfig(
        inputs=[source],
        tokenizer=f"sentencepiece:{tokenizer}",
        seq_len=seq_len,
        out=out,
        workers=workers,
        shard_samples=shard_samples,
        val_docs=val_docs,
        seed=seed,
        progress=progress,
    )
    return prepare(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.tiny_corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--val-docs", type=int, help="default: docs // 20")
    parser.add_argument("--shard-samples", type=int, default=256)
    parser.add_argument("--no-zstd", action="store_true",
                        help="write the source as plain .jsonl (no zstandard package needed; the same samples)")
    args = parser.parse_args(argv)
    try:
        make_tiny_corpus(args.out, args.docs, args.seed, args.seq_len, args.val_docs, args.shard_samples,
                         zstd=not args.no_zstd)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
