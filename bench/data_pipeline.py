"""Data pipeline throughput: tokenize + pack + write (prepare), and the loader on one core.

    python bench/data_pipeline.py                    # defaults: ~16 MB of English text, workers 1 and 2
    python bench/data_pipeline.py --tokenizer tiktoken:gpt2 --input pile/00.jsonl.zst   # on a real machine

Prepare: MB/s of input text and tokens/s, total and per worker, for each --workers value, plus the
tokenizer alone on one core (so the pipeline's own cost is visible). Worker processes are spawned and
import torch (through webdataset), a one-time cost of seconds; `steady_*` subtracts it (measured
separately), and `main_process_ceiling_tokens_per_s` is where the single main process (read, pack,
order) would cap the pipeline with unlimited workers. Without --input the text is English
prose from Python's bundled documentation (pydoc_data.topics, repeated to --text-mb), written as
jsonl.zst. Without --tokenizer (GPT-2's file is not available offline here) it is tiktoken with GPT-2's
split pattern and a byte-level BPE of --vocab ranks trained on that text with `tokenizers`.

Loader: GlobalOrderLoader over synthetic shards (--loader-mb of uint16 tokens, seq_len 2048), global
order, decode included (tar record parse, doc_ids, int64 tensors), num_workers=0 so one core does all.
Results print as JSON lines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.loader import GlobalOrderLoader  # noqa: E402
from data_pipeline.manifest import FORMAT, MANIFEST, crc_file, write_json_atomic  # noqa: E402
from data_pipeline.prepare import PrepareConfig, prepare  # noqa: E402
from data_pipeline.readers import file_sha256  # noqa: E402
from data_pipeline.shard_format import RecordLayout, write_shard  # noqa: E402
from data_pipeline.tiny_corpus import write_jsonl_zst  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer, write_tiktoken_file  # noqa: E402

H100_1P3B_TOKENS_PER_S = 50_000


def english_documents(target_mb: float) -> list[str]:
    """Paragraph groups of Python's documentation topics, repeated until `target_mb` MB of text."""
    from pydoc_data.topics import topics

    base = [text for _, text in sorted(topics.items()) if len(text) > 200]
    docs, size = [], 0
    for text in itertools.cycle(base):
        docs.append(text)
        size += len(text.encode())
        if size >= target_mb * 1e6:
            return docs
    return docs


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (as used by byte-level BPE files)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def train_tiktoken_file(path: str, docs: list[str], vocab: int) -> str:
    """Train a byte-level BPE with `tokenizers` and write it as tiktoken ranks; return the spec."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(docs[:2000], trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        token = bytes(to_byte[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    write_tiktoken_file(path, ranks)
    return f"tiktoken:{path}"


def bench_tokenizer(spec: str, docs: list[str]) -> dict:
    tokenizer = load_tokenizer(spec)
    start = time.perf_counter()
    tokens = sum(len(tokenizer.encode(doc)) for doc in docs)
    seconds = time.perf_counter() - start
    mb = sum(len(doc.encode()) for doc in docs) / 1e6
    return {
        "bench": "tokenizer_only",
        "tokenizer": tokenizer.name,
        "MB_per_s": mb / seconds,
        "tokens_per_s": tokens / seconds,
        "bytes_per_token": mb * 1e6 / tokens,
    }


def pool_startup_seconds(spec: str, workers: int) -> float:
    """Wall time to spawn `workers` processes that import the pipeline and load the tokenizer."""
    import multiprocessing

    from data_pipeline.prepare import _init_worker

    if workers == 1:
        return 0.0
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init_worker, initargs=(spec,)
    ) as pool:
        pool.map(abs, range(workers), chunksize=1)
        return time.perf_counter() - start


def bench_prepare(source: str, spec: str, workers: int, seq_len: int, folder: str) -> dict:
    config = PrepareConfig(
        inputs=[source],
        tokenizer=spec,
        seq_len=seq_len,
        out=folder,
        workers=workers,
        shard_samples=1024,
        progress=False,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    manifest = prepare(config)
    seconds, main_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    train = manifest["splits"]["train"]
    startup = pool_startup_seconds(spec, workers)
    return {
        "bench": "prepare",
        "workers": workers,
        "seconds": seconds,
        "tokens": train["input_tokens"],
        "tokens_per_s": train["input_tokens"] / seconds,
        "tokens_per_s_per_worker": train["input_tokens"] / seconds / workers,
        "shards": len(train["shards"]),
        "pool_startup_s": startup,
        "steady_tokens_per_s": train["input_tokens"] / (seconds - startup),
        "main_process_cpu_s": main_cpu,
        "main_process_ceiling_tokens_per_s": train["input_tokens"] / main_cpu if workers > 1 else None,
    }


def synthetic_dataset(folder: str, target_mb: float, seq_len: int, shard_samples: int = 256) -> None:
    """Shards of random uint16 tokens (vocab 50257) with a document start every ~500 tokens."""
    rng = np.random.default_rng(0)
    layout = RecordLayout.build(seq_len, "uint16")
    shards = []
    count = max(1, int(target_mb * 1e6 / (shard_samples * layout.record_bytes)))
    for index in range(count):
        tokens = rng.integers(0, 50257, (shard_samples, seq_len + 1), dtype=np.uint16)
        is_start = rng.random((shard_samples, seq_len + 1)) < 1 / 500
        name = f"train-{index:06d}.tar"
        info = write_shard(os.path.join(folder, name), layout, index * shard_samples, tokens, is_start)
        with open(os.path.join(folder, crc_file("train")), "ab") as f:
            f.write(info.pop("crc32").astype("<u4").tobytes())
        shards.append({"name": name, "samples": shard_samples, "tokens": tokens.size, **info})
    tokenizer = {
        "spec": "synthetic",
        "name": "synthetic",
        "vocab_size": 50257,
        "eos_id": 50256,
        "vocab_hash": "0" * 64,
    }
    sha, size = file_sha256(folder, crc_file("train"))
    split = {
        "shards": shards,
        "sample_crc32": {"name": crc_file("train"), "bytes": size, "sha256": sha},
        "samples": count * shard_samples,
        "tokens": count * shard_samples * (seq_len + 1),
    }
    manifest = {
        "format": FORMAT,
        "seq_len": seq_len,
        "token_dtype": "uint16",
        "tokenizer": tokenizer,
        "seed": 0,
        "layout": layout.to_dict(),
        "splits": {"train": split},
    }
    write_json_atomic(os.path.join(folder, MANIFEST), manifest)


def bench_loader(folder: str, micro_batch: int, seconds: float, num_workers: int) -> dict:
    loader = GlobalOrderLoader(
        folder,
        global_batch_size=micro_batch * 8,
        micro_batch_size=micro_batch,
        seed=1,
        num_workers=num_workers,
    )
    stream = iter(loader)
    next(stream)
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(stream)["input_ids"].numel()
    rate = tokens / (time.perf_counter() - start)
    return {
        "bench": "loader",
        "num_workers": num_workers,
        "micro_batch": micro_batch,
        "seq_len": loader.seq_len,
        "samples": loader.samples_per_epoch,
        "tokens_per_s": rate,
        "x_h100_1p3b_demand": rate / H100_1P3B_TOKENS_PER_S,
    }


def provenance() -> dict:
    """Machine, Python, date and git revision of this run."""
    import datetime
    import platform
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    )
    return {
        "bench": "meta",
        "date": datetime.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "git": revision.stdout.strip() or "unknown",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", help="a corpus file (default: generated English prose)")
    parser.add_argument("--tokenizer", help="tokenizer spec (default: tiktoken, GPT-2 pattern, trained BPE)")
    parser.add_argument("--text-mb", type=float, default=64.0)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--loader-mb", type=float, default=200.0)
    parser.add_argument("--loader-seconds", type=float, default=10.0)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    print(json.dumps(provenance()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        docs = english_documents(args.text_mb) if args.input is None else None
        source = args.input or os.path.join(tmp, "english.jsonl.zst")
        if docs is not None:
            write_jsonl_zst(source, docs)
        spec = args.tokenizer or train_tiktoken_file(os.path.join(tmp, "bench.tiktoken"), docs, args.vocab)
        if docs is not None:
            print(json.dumps(bench_tokenizer(spec, docs[: max(1, len(docs) // 4)])), flush=True)
        text_mb = sum(len(d.encode()) for d in docs) / 1e6 if docs is not None else None
        for workers in args.workers:
            result = bench_prepare(source, spec, workers, args.seq_len, os.path.join(tmp, f"prep{workers}"))
            if text_mb is not None:
                result["text_MB"] = text_mb
                result["MB_per_s"] = text_mb / result["seconds"]
                result["MB_per_s_per_worker"] = result["MB_per_s"] / workers
                result["steady_MB_per_s"] = text_mb / (result["seconds"] - result["pool_startup_s"])
            print(json.dumps(result), flush=True)
        folder = os.path.join(tmp, "synthetic")
        os.makedirs(folder)
        synthetic_dataset(folder, args.loader_mb, args.seq_len)
        for num_workers in args.loader_workers:
            print(
                json.dumps(bench_loader(folder, args.micro_batch, args.loader_seconds, num_workers)),
                flush=True,
            )


if __name__ == "__main__":
    main()
