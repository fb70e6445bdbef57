"""The global order: identical for any ranks / workers / location, exact resume, full coverage per epoch."""

from __future__ import annotations

import functools
import http.server
import itertools
import os
import threading

import numpy as np
import pytest
import torch
from datatest_utils import read_manifest

from data_pipeline.errors import LoaderStateError
from data_pipeline.loader import GlobalOrderLoader, ValidationLoader
from data_pipeline.order import EpochPermutation

G, M = 8, 2


def global_stream(
    data_dir,
    ranks: int,
    workers: int,
    steps: int,
    state: dict | None = None,
    seed: int = 0,
    key: str = "sample_index",
) -> torch.Tensor:
    """`steps` global batches [steps*G, ...] reassembled from the micro-batches of every rank."""
    per_rank = []
    for rank in range(ranks):
        loader = GlobalOrderLoader(
            str(data_dir),
            global_batch_size=G,
            micro_batch_size=M,
            dp_rank=rank,
            dp_size=ranks,
            seed=seed,
            num_workers=workers,
        )
        if state is not None:
            loader.load_state_dict(state)
        micro = list(itertools.islice(loader, steps * loader.accumulation_steps))
        per_rank.append(
            [
                torch.cat(
                    [
                        b[key]
                        for b in micro[s * loader.accumulation_steps : (s + 1) * loader.accumulation_steps]
                    ]
                )
                for s in range(steps)
            ]
        )
    return torch.cat([torch.cat([per_rank[r][s] for r in range(ranks)]) for s in range(steps)])


def num_train_samples(prepared) -> int:
    return read_manifest(prepared)["splits"]["train"]["samples"]


@pytest.mark.parametrize("ranks,workers", [(1, 0), (2, 2), (4, 1)], ids=["R1-W0", "R2-W2", "R4-W1"])
def test_same_global_sequence_for_any_ranks_and_workers(prepared, ranks, workers):
    n = num_train_samples(prepared)
    state = {"consumed_samples": n - 3 * G - 3}  # cross into epoch 1
    indices = global_stream(prepared, ranks, workers, steps=6, state=state)
    positions = np.arange(n - 3 * G - 3, n + 3 * G - 3)
    expected = np.where(
        positions < n, EpochPermutation(n, 0, 0)(positions % n), EpochPermutation(n, 0, 1)(positions % n)
    )
    assert indices.tolist() == expected.tolist()
    tokens = global_stream(prepared, ranks, workers, steps=2, key="input_ids")
    assert torch.equal(tokens, global_stream(prepared, 1, 0, steps=2, key="input_ids"))


def test_batch_contents(prepared):
    batch = next(iter(GlobalOrderLoader(str(prepared), global_batch_size=G, micro_batch_size=M)))
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (M, 32)
    assert batch["doc_ids"].dtype == torch.int32 and batch["doc_ids"].shape == (M, 32)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    doc_ids = batch["doc_ids"]
    assert (
        (doc_ids[:, 0] == 0).all() and (doc_ids.diff(dim=1) >= 0).all() and (doc_ids.diff(dim=1) <= 1).all()
    )
    eos = read_manifest(prepared)["tokenizer"]["eos_id"]
    ids = batch["input_ids"]
    # a document starts right after each EOS, and only there
    starts = doc_ids.diff(dim=1) == 1
    assert torch.equal(starts, ids[:, :-1] == eos)


@pytest.mark.parametrize("resume_ranks", [2, 4, 1])
def test_resume_equals_uninterrupted(prepared, resume_ranks):
    full = global_stream(prepared, 2, 0, steps=7)
    loader = GlobalOrderLoader(str(prepared), global_batch_size=G, micro_batch_size=M, dp_rank=1, dp_size=2)
    stream = iter(loader)
    for _ in range(3 * loader.accumulation_steps + 1):  # 3 global batches and one micro-batch of the next
        next(stream)
    state = loader.state_dict()
    assert state["consumed_samples"] == 3 * G
    resumed = global_stream(prepared, resume_ranks, 0, steps=4, state=state)
    assert torch.equal(resumed, full[3 * G :])


def test_every_sample_once_per_epoch_and_seeds_differ(prepared):
    n = num_train_samples(prepared)
    steps = -(-2 * n // G)
    indices = global_stream(prepared, 1, 0, steps=steps, seed=5).numpy()
    assert sorted(indices[:n].tolist()) == list(range(n))
    assert sorted(indices[n : 2 * n].tolist()) == list(range(n))
    assert indices[:n].tolist() != indices[n : 2 * n].tolist()
    other = global_stream(prepared, 1, 0, steps=3, seed=6).numpy()
    assert other.tolist() != indices[: 3 * G].tolist()


def test_state_dict_checks_data_and_seed(prepared):
    loader = GlobalOrderLoader(str(prepared), global_batch_size=G, micro_batch_size=M, seed=1)
    state = loader.state_dict()
    other = GlobalOrderLoader(str(prepared), global_batch_size=G, micro_batch_size=M, seed=2)
    with pytest.raises(LoaderStateError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(LoaderStateError, match="data_fingerprint"):
        loader.load_state_dict({**state, "data_fingerprint": "x"})


def test_stale_iterator_is_refused(prepared):
    loader = GlobalOrderLoader(str(prepared), global_batch_size=G, micro_batch_size=M)
    first = iter(loader)
    next(first)
    loader.load_state_dict({"consumed_samples": 0})
    with pytest.raises(RuntimeError, match="stale"):
        next(first)


def test_bad_batch_shapes():
    with pytest.raises(ValueError, match="multiple"):
        GlobalOrderLoader("unused", global_batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalOrderLoader("unused", global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=2)


def test_validation_order_is_fixed_and_split_across_ranks(prepared):
    n_val = read_manifest(prepared)["splits"]["val"]["samples"]
    seen = []
    for rank in range(2):
        loader = ValidationLoader(str(prepared), batch_size=2, dp_rank=rank, dp_size=2, max_samples=9)
        assert len(loader) == 2
        seen.append([b["sample_index"].tolist() for b in loader])
    assert seen == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    all_val = ValidationLoader(str(prepared), batch_size=1, num_workers=1)
    assert [b["sample_index"].item() for b in all_val] == list(range(n_val))


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range GET support (the stdlib handler ignores Range)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        ranged = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not ranged or not os.path.isfile(path):
            return super().do_GET()
        start, end = (int(x) for x in ranged.removeprefix("bytes=").split("-"))
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{os.path.getsize(path)}")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_url(prepared):
    handler = functools.partial(_RangeHandler, directory=str(prepared))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_give_the_same_stream(prepared, http_url):
    local = global_stream(prepared, 2, 0, steps=3, key="input_ids")
    assert torch.equal(global_stream(http_url, 2, 1, steps=3, key="input_ids"), local)
    assert torch.equal(global_stream(f"file://{prepared}", 2, 0, steps=3, key="input_ids"), local)
    assert torch.equal(global_stream(f"pipe:cat {prepared}/{{}}", 2, 0, steps=3, key="input_ids"), local)
