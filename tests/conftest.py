"""Shared test setup: repository root on sys.path, one thread per op, the tiny corpus fixture."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, Triton kernels run in its CPU interpreter. Triton reads this when it is first imported, and
# torch._dynamo imports it as a side effect (e.g. of building a model), so it must be set before any test runs.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_data")
    from data_pipeline.tiny_corpus import zstd_available

    # plain .jsonl where zstandard is missing (a GPU machine given only some wheels); the same samples
    plain = [] if zstd_available() else ["--no-zstd"]
    subprocess.run([sys.executable, "-m", "data_pipeline.tiny_corpus", "--out", str(out), "--seq-len", "128", *plain],
                   cwd=ROOT, check=True, capture_output=True)
    return out
