"""`python -m data_pipeline.inspect DIR`: what a prepared data folder holds; checks; one decoded sample.

    python -m data_pipeline.inspect DIR                # shards, samples, tokens, tokenizer per split
    python -m data_pipeline.inspect DIR --verify       # sha256 of every shard and checksum file
    python -m data_pipeline.inspect DIR --show 12      # sample at position 12 of the global order

`--show` uses the manifest's tokenizer spec unless `--tokenizer` names another file (it must have the same
vocabulary hash), and the order of `--seed` (default: the manifest's seed; the trainer's seed decides the
order it sees). Document starts are marked with `‖`. Exit status 1 on any problem.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.loader import SampleStore
from data_pipeline.manifest import Manifest, load_manifest
from data_pipeline.order import GlobalOrder
from data_pipeline.readers import is_local
from data_pipeline.tokenizer import check_tokenizer, load_tokenizer

DOC_MARK = "‖"


def summary(manifest: Manifest) -> str:
    """A few lines: tokenizer, sequence length, and per split shards, samples, tokens and skips."""
    tok = manifest.tokenizer
    lines = [
        f"data: {manifest.data_dir}",
        f"tokenizer: {tok['name']} ({tok['spec']}), vocab {tok['vocab_size']}, eos {tok['eos_id']}, "
        f"hash {tok['vocab_hash'][:16]}",
        f"seq_len: {manifest.seq_len} (samples of {manifest.seq_len + 1} {manifest.layout.dtype} tokens), "
        f"seed {manifest.data['seed']}",
    ]
    for name, split in sorted(manifest.data["splits"].items()):
        size = sum(shard["bytes"] for shard in split["shards"])
        lines.append(
            f"{name}: {len(split['shards'])} shards, {split['samples']:,} samples, {split['tokens']:,} tokens, "
            f"{split['documents']:,} documents, {size / 2**20:.1f} MiB; dropped tail {split['dropped_tail_tokens']} "
            f"tokens, blank lines {split['blank_lines']}, empty documents {split['empty_documents']}, "
            f"skipped {split['skipped'] or 0}"
        )
    return "\n".join(lines)


def show(manifest: Manifest, split: str, position: int, seed: int, tokenizer_spec: str | None) -> str:
    """Sample at stream position `position` of `split` under `seed`, decoded document by document."""
    tokenizer = load_tokenizer(tokenizer_spec or _recorded_spec(manifest))
    check_tokenizer(tokenizer, manifest.tokenizer, manifest.where)
    store = SampleStore(manifest, split)
    order = GlobalOrder(store.num_samples, seed, shuffle=split == "train")
    index = int(order.samples(np.array([position]))[0])
    tokens, is_start = store.read(np.array([index]))
    starts = [0, *np.flatnonzero(is_start[0][1:]) + 1, len(tokens[0])]
    pieces = [
        tokenizer.decode(tokens[0][a:b].tolist())
        for a, b in zip(starts[:-1], starts[1:], strict=True)
        if b > a
    ]
    header = f"{split} position {position} (epoch {position // store.num_samples}) = sample {index}:"
    return header + "\n" + DOC_MARK.join(pieces)


def _recorded_spec(manifest: Manifest) -> str:
    """The manifest's tokenizer spec; a file that moved with a local data folder is found inside it."""
    spec = manifest.tokenizer["spec"]
    kind, _, path = spec.partition(":")
    beside = os.path.join(manifest.data_dir, os.path.basename(path))
    if (
        os.path.sep in path
        and not os.path.exists(path)
        and is_local(manifest.data_dir)
        and os.path.isfile(beside)
    ):
        return f"{kind}:{beside}"
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.inspect", description=__doc__.split("\n")[0]
    )
    parser.add_argument("data_dir")
    parser.add_argument("--verify", action="store_true", help="check every shard's sha256")
    parser.add_argument("--show", type=int, metavar="N", help="decode the sample at position N of the order")
    parser.add_argument("--split", default="train")
    parser.add_argument("--seed", type=int, help="order seed for --show (default: the manifest's)")
    parser.add_argument("--tokenizer", help="tokenizer spec for --show (default: the manifest's)")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.data_dir)
        print(summary(manifest))
        if args.verify:
            problems = [p for name in manifest.data["splits"] for p in manifest.verify(name)]
            for problem in problems:
                print(f"FAILED {problem}")
            files = sum(
                len(split["shards"]) + ("sample_crc32" in split) for split in manifest.data["splits"].values()
            )
            print(
                f"verify: {files - len(problems)} of {files} files (shards, checksum files) match the manifest"
            )
            if problems:
                return 1
        if args.show is not None:
            seed = manifest.data["seed"] if args.seed is None else args.seed
            print(show(manifest, args.split, args.show, seed, args.tokenizer))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
