"""docs/DATA.md stays true: it names every manifest key, its layout table and decoding recipe match the
code, and the order behaves at an epoch's end as it says (issue 14 item 16)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from datatest_utils import read_manifest

from data_pipeline.loader import SampleStore
from data_pipeline.manifest import load_manifest
from data_pipeline.order import GlobalOrder
from data_pipeline.shard_format import RecordLayout

DATA_MD = Path(__file__).resolve().parents[2] / "docs" / "DATA.md"


def test_every_manifest_key_is_documented(prepared):
    text = DATA_MD.read_text()
    manifest = read_manifest(prepared)
    split = manifest["splits"]["train"]
    keys = (
        set(manifest)
        | set(manifest["tokenizer"])
        | set(manifest["layout"])
        | set(split)
        | set(split["shards"][0])
        | set(split["sample_crc32"])
    )
    # a key counts as documented when it is a word inside a `code` span (outside the code blocks)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    documented = {word for span in re.findall(r"`([^`]+)`", prose) for word in re.findall(r"[\w.]+", span)}
    missing = sorted(keys - documented)
    assert not missing, f"docs/DATA.md does not name manifest keys {missing}"
    assert f"`{manifest['format']}`" in text


def test_layout_table_matches_the_code():
    text = DATA_MD.read_text()
    small, large = RecordLayout.build(2048, "uint16"), RecordLayout.build(2048, "uint32")
    assert f"| `record_bytes` | {small.record_bytes} | {large.record_bytes} |" in text
    assert (
        f"| `docstarts_offset`, `docstarts_bytes` | {small.docstarts_offset}, {small.docstarts_bytes} | "
        f"{large.docstarts_offset}, {large.docstarts_bytes} |" in text
    )
    assert (
        f"| `tokens_offset`, `tokens_bytes` | {small.tokens_offset}, {small.tokens_bytes} | "
        f"{large.tokens_offset}, {large.tokens_bytes} |" in text
    )


def test_the_documented_recipe_decodes_a_shard_like_the_loader(prepared):
    """Plain webdataset + numpy, as docs/DATA.md shows, and the crc32 file read with np.fromfile."""
    import zlib

    import webdataset as wds

    manifest = load_manifest(str(prepared))
    store = SampleStore(manifest, "train")
    shard = manifest.split("train")["shards"][1]
    first = int(manifest.shard_offsets("train")[1])
    tokens, is_start = store.read(np.arange(first, first + shard["samples"]))
    decoded = list(wds.WebDataset(str(prepared / shard["name"]), shardshuffle=False))
    assert [s["__key__"] for s in decoded] == [f"{first + j:010d}" for j in range(shard["samples"])]
    for j, sample in enumerate(decoded):
        row = np.load(io.BytesIO(sample["tokens.npy"]))
        bits = np.load(io.BytesIO(sample["docstarts.npy"]))
        assert row.dtype == np.dtype("<u2") and bits.dtype == np.uint8 and len(bits) == (len(row) + 7) // 8
        assert np.array_equal(row, tokens[j])
        assert np.array_equal(
            np.unpackbits(bits, count=len(row), bitorder="little").astype(bool), is_start[j]
        )
    crcs = np.fromfile(prepared / "train.crc32", "<u4")
    record = manifest.layout.record_bytes
    data = (prepared / shard["name"]).read_bytes()
    assert [zlib.crc32(data[j * record : (j + 1) * record]) for j in range(3)] == crcs[
        first : first + 3
    ].tolist()


def test_a_global_batch_across_an_epoch_end_can_repeat_a_sample_and_each_epoch_is_whole():
    n, batch = 10, 4
    order = GlobalOrder(n, seed=0)
    repeats = []
    for seed in range(50):
        order = GlobalOrder(n, seed=seed)
        epochs = order.samples(np.arange(3 * n)).reshape(3, n)
        assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
        straddling = order.samples(np.arange(2 * batch, 3 * batch))  # positions 8..11: epoch 0 and epoch 1
        repeats.append(len(straddling) - len(set(straddling.tolist())))
    assert max(repeats) >= 1, "a batch holding two epochs' positions can hold a sample twice"
    # k = 2 positions from each epoch: about k * (G - k) / N = 0.4 repeats per batch
    assert 0.1 < np.mean(repeats) < 0.8
