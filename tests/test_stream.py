"""The streaming Parquet reader: sharding, shuffling, bounded memory, one-pass encoder fit."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtlrec.data.encoder import Encoder
from mtlrec.data.readers import read_frame
from mtlrec.data.source import BatchSource, InMemorySource
from mtlrec.data.stream import ParquetStream, fit_encoder_stream
from mtlrec.errors import DataError
from mtlrec.schema import Schema

SCHEMA = Schema.from_dict(
    {
        "features": [
            {"name": "user"},
            {"name": "item", "min_freq": 3},
            {"name": "shop"},  # an integer column with a few nulls
            {"name": "page", "hash_buckets": 64},
            {"name": "price", "type": "numeric", "buckets": 8},
            {"name": "tags", "type": "sequence", "sep": "|", "max_len": 3},
        ],
        "tasks": [
            {"name": "click"},
            {"name": "buy", "depends_on": "click"},
            {"name": "rid", "type": "regression"},  # the row id, to check coverage exactly
        ],
    }
)
TAGS = np.array(["", "a", "b", "a|b", "c|a", "b|c|d", "d"], dtype=object)


def write_parquet(path, rows: int, row_group: int, seed: int = 0) -> None:
    """Random rows built with numpy (fast even for 200k rows), small row groups."""
    rng = np.random.default_rng(seed)
    click = rng.random(rows) < 0.3
    shop = rng.integers(0, 40, rows)
    shop_null = np.zeros(rows, dtype=bool)
    shop_null[rng.choice(min(rows, row_group), 3, replace=False)] = True  # first group only
    table = pa.table(
        {
            "user": pa.array(np.char.add("u", rng.integers(0, 500, rows).astype(str))),
            "item": pa.array(np.char.add("i", rng.zipf(1.5, rows).clip(max=10**6).astype(str))),
            "shop": pa.array(shop, mask=shop_null, type=pa.int64()),
            "page": pa.array(np.char.add("p", rng.integers(0, 10**6, rows).astype(str))),
            "price": rng.lognormal(0, 1, rows),
            "tags": pa.array(TAGS[rng.integers(0, len(TAGS), rows)].tolist()),
            "click": click.astype(np.int64),
            "buy": (click & (rng.random(rows) < 0.2)).astype(np.int64),
            "rid": np.arange(rows, dtype=np.int64),
        }
    )
    pq.write_table(table, path, row_group_size=row_group)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "small.parquet"
    write_parquet(path, 20_000, 700)  # 29 row groups, the last one short
    return path


def _ids(batches) -> list[np.ndarray]:
    return [b.labels[:, 2].numpy().astype(np.int64) for b in batches]


def test_two_ranks_visit_every_row_exactly_once_per_epoch(small):
    enc = fit_encoder_stream(SCHEMA, small)
    gen = [torch.Generator().manual_seed(5) for _ in range(2)]  # the same seed on every rank
    streams = [ParquetStream(small, enc, rank=r, world=2, buffer_rows=3000) for r in range(2)]
    assert isinstance(streams[0], BatchSource) and len(streams[0]) == 20_000
    for epoch in range(2):
        per_rank = [list(s.epoch_batches(epoch, 512, g)) for s, g in zip(streams, gen)]
        assert len(per_rank[0]) == len(per_rank[1])  # every step is a collective
        assert all(len(b) <= 256 for batches in per_rank for b in batches)
        ids = np.concatenate([i for batches in per_rank for i in _ids(batches)])
        assert len(ids) == 20_000
        assert np.array_equal(np.sort(ids), np.arange(20_000))
        # ranks read disjoint row groups (700 rows each): no group is split between them
        groups = [set(np.concatenate(_ids(b)) // 700) for b in per_rank]
        assert not groups[0] & groups[1]
        assert streams[0].max_buffered_rows <= 3000 + 700


def test_shuffle_differs_between_epochs_and_batches_match_the_encoder(small):
    enc = fit_encoder_stream(SCHEMA, small)
    stream = ParquetStream(small, enc, buffer_rows=4000)
    gen = torch.Generator().manual_seed(0)
    first = np.concatenate(_ids(stream.epoch_batches(0, 1000, gen)))
    second = np.concatenate(_ids(stream.epoch_batches(1, 1000, gen)))
    assert sorted(first) == sorted(second) == list(range(20_000))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(20_000))
    # rows are mixed across row groups within a batch, not only reordered group by group
    batch = next(iter(stream.epoch_batches(2, 1000, gen)))
    assert len(np.unique(batch.labels[:, 2].numpy() // 700)) > 3
    # a streamed row encodes exactly as the in-memory encoder would encode it
    whole = enc.transform(read_frame(small, columns=SCHEMA.required_columns()))
    order = torch.from_numpy(batch.labels[:, 2].numpy().astype(np.int64))
    expected = whole.take(order)
    for name in ("cat", "seq", "num", "labels"):
        assert torch.equal(getattr(batch, name), getattr(expected, name)), name


def test_same_generator_state_replays_the_same_epoch(small):
    enc = fit_encoder_stream(SCHEMA, small, max_rows=5000)
    stream = ParquetStream(small, enc, buffer_rows=1500, max_rows=5000)
    assert len(stream) == 5000
    gen = torch.Generator().manual_seed(9)
    state = gen.get_state()
    a = np.concatenate(_ids(stream.epoch_batches(0, 500, gen)))
    gen.set_state(state)
    b = np.concatenate(_ids(stream.epoch_batches(0, 500, gen)))
    assert np.array_equal(a, b) and sorted(a) == list(range(5000))


def test_streaming_fit_equals_in_memory_fit(small):
    frame = read_frame(small, columns=SCHEMA.required_columns())
    memory = Encoder(SCHEMA).fit(frame)
    streamed = fit_encoder_stream(SCHEMA, small, read_rows=1000)
    for feat in SCHEMA.features:
        a, b = memory.state[feat.name], streamed.state[feat.name]
        if feat.type == "numeric":
            assert b["mean"] == pytest.approx(a["mean"], rel=1e-12)
            assert b["std"] == pytest.approx(a["std"], rel=1e-12)
            # the reservoir (100k) holds all 20k values: the quantile edges are exact too
            assert b["edges"] == pytest.approx(a["edges"], rel=1e-12)
        else:
            assert b == a, feat.name
    assert any(v.endswith(".0") for v in memory.state["shop"]["vocab"])  # nulls -> float text
    # a small reservoir gives approximate edges (bounded memory, documented)
    approx = fit_encoder_stream(SCHEMA, small, reservoir=2000).state["price"]["edges"]
    assert len(approx) == len(memory.state["price"]["edges"])
    assert np.allclose(approx, memory.state["price"]["edges"], rtol=0.15)


def test_peak_memory_is_bounded_by_the_buffer_not_the_file(tmp_path):
    """tracemalloc sees numpy and Python allocations: the reader keeps its buffer in numpy
    arrays and yields zero-copy tensor views of them, so all of its data is counted."""
    path = tmp_path / "big.parquet"
    write_parquet(path, 200_000, 2000)  # 100 row groups; the buffer holds 2.5% of the file
    # fewer string columns than SCHEMA: tracemalloc makes every Python object slow to create
    slim = Schema.from_dict(
        {
            "features": [{"name": "user"}, {"name": "shop"}, {"name": "price", "type": "numeric"}],
            "tasks": [{"name": "click"}, {"name": "rid", "type": "regression"}],
        }
    )
    enc = fit_encoder_stream(slim, path, max_rows=20_000)
    stream = ParquetStream(path, enc, buffer_rows=5000, read_rows=2000)

    tracemalloc.start()
    seen = 0
    for batch in stream.epoch_batches(0, 1024, torch.Generator().manual_seed(1)):
        seen += len(batch)
    stream_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == 200_000
    assert stream.max_buffered_rows <= 5000 + 2000

    tracemalloc.start()
    whole = enc.transform(read_frame(path, columns=slim.required_columns()))
    memory_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(whole) == 200_000
    # Streaming holds a few buffers' worth; loading holds the whole file (raw + encoded).
    assert stream_peak < memory_peak / 8, (stream_peak, memory_peak)
    assert stream_peak < 8 * 2**20


def test_in_memory_source_is_a_batch_source(funnel_tables):
    _, train, _ = funnel_tables
    source = InMemorySource(train)
    assert isinstance(source, BatchSource)
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    ours = list(source.epoch_batches(0, 512, gen_a))
    plain = list(train.batches(512, shuffle=True, generator=gen_b))
    assert len(ours) == len(plain) == source.num_batches(512)
    assert all(torch.equal(a.cat, b.cat) for a, b in zip(ours, plain))


@pytest.mark.parametrize(
    "column, value, needle",
    [("click", 3, "label 3 is not 0 or 1"), ("price", "abc", "'abc' is not a number")],
)
def test_a_bad_row_is_named_by_its_row_in_the_file(tmp_path, small, column, value, needle):
    """Row groups of 700 rows read 300 rows at a time: the error counts from the file's first row,
    not from the row group or the record batch it was read in."""
    enc = fit_encoder_stream(SCHEMA, small)
    frame = read_frame(small).reset_index(drop=True)
    frame[column] = frame[column].astype(object)
    frame.loc[1234, column] = value  # row group 1, its 535th row; the 2nd batch of 300 there
    path = tmp_path / "bad.parquet"
    table = pa.Table.from_pandas(frame.astype({column: str}) if column == "price" else frame)
    pq.write_table(table, path, row_group_size=700)
    stream = ParquetStream(path, enc, read_rows=300, buffer_rows=512)
    with pytest.raises(DataError, match=rf"bad.parquet: column '{column}' row 1234: {needle}"):
        list(stream.epoch_batches(0, 256, torch.Generator().manual_seed(0)))
    if column == "price":
        with pytest.raises(DataError, match="bad.parquet: column 'price' row 1234"):
            fit_encoder_stream(SCHEMA, path, read_rows=300)
