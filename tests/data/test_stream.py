import json
from collections import Counter

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmfm.data import shards
from mmfm.data.stream import ShardStream, read_shard, to_torch

SIZES, GROUPS = (10, 23, 37), (4, 7, 8)  # rows and row-group rows of the three shards
T = sum(SIZES)
ALL = ("image_id", "label", "cls", "tokens")


def make(tmp_path, dtype=np.float16, sizes=SIZES, groups=GROUPS, grid=(2, 3), **meta):
    """Shards whose ``image_id`` runs 0 .. T-1 over the files; returns the written columns, concatenated."""
    rng, written, start = np.random.default_rng(0), {c: [] for c in ALL}, 0
    for i, (n, g) in enumerate(zip(sizes, groups)):
        ids = np.arange(start, start + n)
        cols = {"image_id": ids, "label": (ids % 10).astype(np.int32),
                "cls": rng.standard_normal((n, 5)).astype(np.float32),
                "tokens": rng.standard_normal((n, grid[0] * grid[1], 4)).astype(dtype)}
        shards.write_shard(tmp_path / f"s{i}.parquet", cols,
                           {"encoder": "pixels", "grid": list(grid), "token_dim": 4, "cls_dim": 5, **meta},
                           row_group_rows=g)
        for c in ALL:
            written[c].append(cols[c])
        start += n
    return {c: np.concatenate(v) for c, v in written.items()}


def stream(tmp_path, rank=0, world_size=1, batch_size=4, **kw):
    return ShardStream(tmp_path, batch_size, columns=kw.pop("columns", ALL), rank=rank, world_size=world_size,
                       buffer_rows=kw.pop("buffer_rows", 16), **kw)


def ids(batches):
    return [b["image_id"].tolist() for b in batches]


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(
        x[c].dtype == y[c].dtype and np.array_equal(x[c], y[c]) for c in x) for x, y in zip(a, b))


def group_of():
    """Row id -> index of its row group over all shards."""
    return np.concatenate([np.arange(n) // g + 100 * i for i, (n, g) in enumerate(zip(SIZES, GROUPS))])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_values_and_shapes_round_trip(tmp_path, dtype):
    written = make(tmp_path, dtype)
    got = list(stream(tmp_path, shuffle=False, batch_size=6))
    assert len(got) == -(-T // 6) and [len(b["image_id"]) for b in got] == [6] * 11 + [4]
    assert [got[0][c].shape for c in ("tokens", "cls", "label")] == [(6, 6, 4), (6, 5), (6,)]
    for c in ALL:
        assert np.array_equal(np.concatenate([b[c] for b in got]), written[c]), c
        assert got[0][c].dtype == written[c].dtype
    for b in stream(tmp_path, shuffle=True, batch_size=6):  # shuffled rows keep their own values
        for c in ALL:
            assert np.array_equal(b[c], written[c][b["image_id"]])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 5, 7])  # T = 70 splits evenly: no padding
def test_every_row_once_per_epoch(tmp_path, world_size, shuffle):
    make(tmp_path)
    for epoch in range(2):
        seen = []
        for r in range(world_size):
            s = stream(tmp_path, r, world_size, shuffle=shuffle)
            s.set_epoch(epoch)
            seen += [i for b in ids(s) for i in b]
        assert sorted(seen) == list(range(T))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [3, 4, 6, 8])
def test_padding_wraps_around_to_the_epochs_first_rows(tmp_path, world_size, shuffle):
    make(tmp_path)
    runs = [ids(stream(tmp_path, r, world_size, shuffle=shuffle)) for r in range(world_size)]
    per_rank = -(-T // world_size)
    assert all(sum(map(len, run)) == per_rank for run in runs)
    pad = world_size * per_rank - T
    counts = Counter(i for run in runs for b in run for i in b)
    assert set(counts) == set(range(T)) and sorted(counts.values()) == [1] * (T - pad) + [2] * pad
    if not shuffle:  # the padding is the epoch's first rows, at the end of the last rank
        assert [i for b in runs[-1] for i in b][-pad:] == list(range(pad))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_drop_last_drops_the_tail_and_keeps_batches_full(tmp_path, world_size, shuffle):
    make(tmp_path)
    runs = [ids(stream(tmp_path, r, world_size, batch_size=8, shuffle=shuffle, drop_last=True))
            for r in range(world_size)]
    kept = [i for run in runs for b in run for i in b]
    assert all(len(b) == 8 for run in runs for b in run) and len(kept) == len(set(kept))
    assert len(kept) == T // (world_size * 8) * world_size * 8
    if not shuffle:
        assert sorted(kept) == list(range(len(kept)))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_rank_yields_the_same_number_of_batches(tmp_path, shuffle, drop_last):
    make(tmp_path)
    for world_size in range(1, 7):
        for batch_size in (1, 3, 8, 64):
            sizes = [[len(b) for b in ids(stream(tmp_path, r, world_size, batch_size, shuffle=shuffle,
                                                 drop_last=drop_last))] for r in range(world_size)]
            assert all(s == sizes[0] for s in sizes), (world_size, batch_size)
            assert len(sizes[0]) == len(stream(tmp_path, 0, world_size, batch_size, drop_last=drop_last))


def test_reproducible_and_epochs_and_seeds_differ(tmp_path):
    make(tmp_path)

    def run(epoch=0, seed=0, rank=0):
        s = stream(tmp_path, rank, 2, shuffle=True, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert same(run(), run()) and same(run(3, 5, 1), run(3, 5, 1))
    assert ids(run(0)) != ids(run(1)) and ids(run(0, 0)) != ids(run(0, 1)) and ids(run(0)) != ids(run(0, 0, 1))
    s = stream(tmp_path, 0, 2, shuffle=True)  # iterating again starts the next epoch
    assert same(list(s), run(0)) and same(list(s), run(1)) and s.epoch == 2


def test_buffer_mixes_rows_across_row_groups(tmp_path):
    make(tmp_path)
    group = group_of()

    def mixing(**kw):
        """Mean number of distinct row groups per batch of 8 rows."""
        return np.mean([len(set(group[b])) for b in ids(stream(tmp_path, batch_size=8, **kw))])

    in_order = mixing(shuffle=False)
    groups_only = mixing(shuffle=True, buffer_rows=0)  # row groups permuted, rows mixed within ~2 groups
    assert in_order <= 2 and groups_only <= 2.5
    for seed in range(5):
        assert mixing(shuffle=True, buffer_rows=32, seed=seed) > 4.5  # of at most 8


@pytest.mark.parametrize("shuffle,drop_last,world_size", [(True, False, 3), (True, True, 2), (False, False, 3),
                                                           (True, False, 1)])
def test_resume_from_every_cut_point_is_exact(tmp_path, shuffle, drop_last, world_size):
    make(tmp_path)
    kw = dict(world_size=world_size, batch_size=3, shuffle=shuffle, drop_last=drop_last, seed=7)
    for rank in range(world_size):
        full = stream(tmp_path, rank, **kw)
        n = len(full)
        whole = list(full) + list(full)  # epochs 0 and 1
        for cut in range(2 * n + 1):
            s = stream(tmp_path, rank, **kw)
            it = s.forever()
            for _ in range(cut):
                next(it)
            state = json.loads(json.dumps(s.state_dict()))
            assert (state["epoch"], state["batches"]) == divmod(cut, n)
            resumed = stream(tmp_path, rank, **{**kw, "seed": 0})  # the seed comes with the state
            resumed.load_state_dict(state)
            tail = [b for _, b in zip(range(2 * n - cut), resumed.forever())]  # to the end of epoch 1
            assert same(tail, whole[cut:]), cut


def test_resume_skips_spent_row_groups(tmp_path, monkeypatch):
    make(tmp_path)
    reads = []
    read = ShardStream._read
    monkeypatch.setattr(ShardStream, "_read", lambda self, seg: reads.append(seg) or read(self, seg))
    for shuffle in (False, True):
        s = stream(tmp_path, shuffle=shuffle, buffer_rows=8)
        list(s)
        full, reads[:] = len(reads), []
        s.load_state_dict({**s.state_dict(), "epoch": 0, "batches": len(s) - 1})
        assert len(list(s)) == 1 and len(reads) < full / 2, (shuffle, len(reads), full)
        reads.clear()


def test_set_epoch_and_state_after_an_epoch(tmp_path):
    make(tmp_path)
    s = stream(tmp_path)
    first = list(s)
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["batches"] == 0
    s.set_epoch(0)
    assert same(list(s), first)
    it = iter(s)
    next(it)
    s.set_epoch(1)  # the stream is in epoch 1 already: it keeps its place
    assert s.state_dict()["batches"] == 1 and len(list(s)) == len(s) - 1


def test_state_mismatch_is_refused(tmp_path):
    make(tmp_path)
    state = stream(tmp_path, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size 2, this stream 3"):
        stream(tmp_path, world_size=3).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        stream(tmp_path, world_size=2, batch_size=5).load_state_dict(state)
    with pytest.raises(ValueError, match="shards"):
        stream([tmp_path / "s0.parquet", tmp_path / "s1.parquet"], world_size=2).load_state_dict(state)


def test_mismatched_shards_are_refused(tmp_path):
    make(tmp_path)
    make(tmp_path / "b", grid=(3, 2))
    with pytest.raises(ValueError, match=r"b/s0.parquet: metadata 'grid' is \[3, 2\] but .*s0.parquet has"):
        ShardStream([tmp_path, tmp_path / "b" / "s0.parquet"], 4)
    make(tmp_path / "c", dtype=np.float32)
    with pytest.raises(ValueError, match=r"c/s0.parquet: column 'tokens' is 'float32\[24\]' but .*'float16\[24\]'"):
        ShardStream([tmp_path, tmp_path / "c" / "s0.parquet"], 4)
    make(tmp_path / "d", encoder="other")
    with pytest.raises(ValueError, match="metadata 'encoder' is 'other'"):
        ShardStream([tmp_path, tmp_path / "d"], 4)
    with pytest.raises(ValueError, match=r"no column\(s\) \['flip'\]"):
        ShardStream(tmp_path, 4, columns=("flip",))
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ShardStream(tmp_path, 4, rank=2, world_size=2)


def test_rank_and_world_size_from_torch_distributed(tmp_path, monkeypatch):
    make(tmp_path)
    assert (ShardStream(tmp_path, 4).rank, ShardStream(tmp_path, 4).world_size) == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    s = ShardStream(tmp_path, 4)
    assert (s.rank, s.world_size, len(s)) == (2, 3, 6)


def test_as_torch(tmp_path):
    written = make(tmp_path)
    (b,) = [b for _, b in zip(range(1), stream(tmp_path, as_torch=True, shuffle=False))]
    assert b["tokens"].dtype == torch.float16 and b["tokens"].shape == (4, 6, 4)
    assert b["label"].dtype == torch.int32 and torch.equal(b["cls"], torch.from_numpy(written["cls"][:4]))
    view, after = list(stream(tmp_path, shuffle=False, batch_size=2))[:2]  # both inside row group 0
    assert arrow_owner(view["tokens"]) is arrow_owner(after["tokens"])  # slices of the decoded row group
    t = to_torch(view)
    assert all(np.shares_memory(t[c].numpy(), view[c]) for c in ALL)
    shuffled = next(iter(stream(tmp_path, as_torch=True)))
    assert shuffled["tokens"].shape == (4, 6, 4) and shuffled["image_id"].dtype == torch.int64


def arrow_owner(a: np.ndarray) -> pa.Array | pa.Buffer:
    """The Arrow array (fixed-size lists, scalars) or buffer (tokens) a numpy array is a view of."""
    while not isinstance(a, (pa.Array, pa.Buffer)):
        a = a.base
    return a


@pytest.mark.parametrize("groups", [(64, 64, 64), GROUPS])  # one row group per file, or several
def test_read_shard_is_zero_copy(tmp_path, groups):
    written = make(tmp_path, groups=groups)
    got = read_shard(tmp_path / "s2.parquet", ALL)
    assert got["tokens"].shape == (37, 6, 4) and got["cls"].shape == (37, 5) and got["label"].shape == (37,)
    for c in ALL:
        a = got[c]
        assert np.array_equal(a, written[c][33:]) and not a.flags.owndata and not a.flags.writeable
        owner = arrow_owner(a)  # the numpy array starts where the Arrow array's data starts
        buffer = owner if isinstance(owner, pa.Buffer) else owner.buffers()[1]
        offset = 0 if isinstance(owner, pa.Buffer) else owner.offset * a.itemsize
        assert a.__array_interface__["data"][0] == buffer.address + offset
        assert np.shares_memory(a, np.frombuffer(buffer, a.dtype))
    with pytest.raises(ValueError, match="no column"):
        read_shard(tmp_path / "s2.parquet", ["nope"])


def test_shards_open_in_pandas_duckdb_and_pyarrow(tmp_path):
    written = make(tmp_path)
    path = tmp_path / "s1.parquet"
    df = pd.read_parquet(path)
    assert list(df.columns) == list(ALL) and df["image_id"].tolist() == list(range(10, 33))
    grids = np.frombuffer(b"".join(df["tokens"]), np.float16).reshape(23, 6, 4)  # raw float16 bytes per row
    assert np.array_equal(grids, written["tokens"][10:33])
    rows = duckdb.sql(f"select image_id, label, len(cls), cls[1], octet_length(tokens) from '{path}' "
                      "order by image_id").fetchall()
    assert rows[0] == (10, 0, 5, pytest.approx(float(written["cls"][10, 0])), 6 * 4 * 2)
    meta = json.loads(pq.read_schema(path).metadata[b"mmfm"])
    assert meta["grid"] == [2, 3] and meta["token_dim"] == 4


def test_metadata_added_to_the_footer_at_close(tmp_path):
    """``mmfm encode`` writes the ``mmfm`` JSON into the footer when it closes the file, not the schema."""
    tokens = np.arange(5 * 24, dtype=np.float32).reshape(5, 24)
    table = pa.table({"label": pa.array(np.arange(5, dtype=np.int32)),
                      "tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens.ravel()), 24)})
    with pq.ParquetWriter(tmp_path / "x.parquet", table.schema) as writer:
        writer.write_table(table, row_group_size=2)
        writer.add_key_value_metadata({"mmfm": json.dumps({"grid": [2, 3], "token_dim": 4})})
    (b,) = ShardStream(tmp_path, 5, columns=("tokens", "label"), shuffle=False)
    assert np.array_equal(b["tokens"], tokens.reshape(5, 6, 4))
    assert np.array_equal(read_shard(tmp_path / "x.parquet", ["tokens"])["tokens"], tokens.reshape(5, 6, 4))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shuffle", [False, True])
def test_a_non_finite_row_is_refused_naming_shard_row_and_image(tmp_path, dtype, shuffle):
    """Row 17 of s2.parquet (its third row group of 8 rows) holds an Inf in its tokens: the stream stops
    before yielding a batch with it, naming the file, the row in the file and the image."""
    from mmfm.data.stream import refuse_non_finite

    written = make(tmp_path, dtype)
    p = tmp_path / "s2.parquet"
    cols = {c: np.array(v) for c, v in read_shard(p, ALL).items()}
    cols["tokens"][17, 3, 1] = np.inf
    cols["tokens"][20, 0, 0] = np.nan
    cols["path"] = [f"cat/{i}.png" for i in cols["image_id"]]
    shards.write_shard(p, cols, json.loads(pq.read_metadata(p).metadata[b"mmfm"]), row_group_rows=8)
    s = stream(tmp_path, shuffle=shuffle, columns=["image_id", "tokens"])
    seen = []
    with pytest.raises(ValueError, match=r"s2\.parquet row 17 \(image cat/50\.png\): tokens has 1 non-finite values "
                                         r"\(NaN/Inf\); 2 rows of this batch do\. mmfm encode leaves such an image "
                                         r"out.*encoding the shard again mends it"):
        for batch in s:
            seen += batch["image_id"].tolist()
    assert 50 not in seen and written["image_id"][50] == 50  # 10 + 23 rows before s2; the row never came out
    refuse_non_finite(p, "cls", cols["cls"])  # finite columns pass
    refuse_non_finite(p, "label", cols["label"])  # as do integers


def test_all_finite_reads_the_exponent_bits():
    from mmfm.data.stream import all_finite

    for dtype in (np.float16, np.float32, np.float64):
        info = np.finfo(dtype)
        a = np.array([[0.0, -1.5, 6e4 if dtype == np.float16 else 1e30], [info.max, info.tiny, -0.0]], dtype)
        assert all_finite(a) and all_finite(a[:, ::2])
        for bad in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b[1, 2] = bad
            assert not all_finite(b) and not all_finite(b[:, ::2])
    assert all_finite(np.array([1, 2])) and not all_finite(np.array([np.nan], np.longdouble))
    big = np.zeros((50, 7), np.float16)
    big[49, 6] = np.inf  # in the last of the slices of 3 rows
    assert not all_finite(big, chunk=21) and all_finite(big[:49], chunk=21) and not all_finite(np.float32(np.nan))
