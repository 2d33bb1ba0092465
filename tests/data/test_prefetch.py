"""The background reader: the stream's batches and positions, errors handed over, data checked on the host."""

import threading

import pytest
import torch

from mmfm.data.prefetch import Prefetch, to_device
from mmfm.data.stream import ShardStream


def test_same_batches_and_the_position_after_each(toy):
    root, _ = toy
    make = lambda: ShardStream(root / "shards", 5, columns=["tokens", "cls"], seed=1, as_torch=True)  # noqa: E731
    direct, expected = make(), []
    it = direct.forever()
    for _ in range(7):  # more than an epoch's batches: the epoch rolls over
        batch = next(it)
        expected.append(({k: v.clone() for k, v in batch.items()}, direct.state_dict()))
    pre = Prefetch(make(), depth=3)
    try:
        for want_batch, want_state in expected:
            batch, state = next(pre)
            assert state == want_state
            assert all(torch.equal(batch[k], want_batch[k]) for k in want_batch)
    finally:
        pre.close()
    assert not pre._thread.is_alive()


class _Stream:
    def __init__(self, batches):
        self.batches = batches

    def forever(self):
        yield from self.batches

    def state_dict(self):
        return {"batches": 0}


def test_non_finite_tokens_are_named():
    good = {"tokens": torch.zeros(2, 3, dtype=torch.float16)}
    bad = {"tokens": torch.tensor([[0.0, float("inf"), 0.0], [0.0, 0.0, float("nan")]], dtype=torch.float16)}
    pre = Prefetch(_Stream([good, bad]))
    next(pre)
    with pytest.raises(ValueError, match=r"column 'tokens' of batch 1 .* holds 2 non-finite values"):
        next(pre)
    pre.close()


def test_labels_out_of_range_are_named_and_the_end_stops():
    pre = Prefetch(_Stream([{"label": torch.tensor([0, 2])}, {"label": torch.tensor([1, 3])}]), num_labels=3)
    assert next(pre)[0]["label"].tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"column 'label' of batch 1 has values in \[1, 3\], expected \[0, 3\)"):
        next(pre)
    pre.close()
    done = Prefetch(_Stream([{"label": torch.tensor([0])}]), num_labels=1)
    assert len(list(done)) == 1


def test_close_stops_a_reader_blocked_on_a_full_queue():
    def endless():
        while True:
            yield {"tokens": torch.zeros(1)}

    class Endless(_Stream):
        def forever(self):
            return endless()

    pre = Prefetch(Endless([]), depth=1)
    next(pre)
    pre.close()
    assert not pre._thread.is_alive()
    assert "mmfm-prefetch" not in [t.name for t in threading.enumerate()]


def test_to_device_casts_after_the_move():
    x = torch.ones(2, dtype=torch.float16)
    y = to_device(x, "cpu", torch.float32)
    assert y.dtype == torch.float32 and torch.equal(y, torch.ones(2))


def test_a_shard_streams_non_finite_row_is_named_by_file_and_row(tmp_path):
    """Through the training path (ShardStream -> Prefetch) a NaN token is refused on the host with the shard
    file and row (the stream checks as it reads; the thread does not check twice)."""
    import numpy as np

    import toyrun
    from mmfm.data import shards
    from mmfm.data.stream import read_shard

    root, _ = toyrun.make_toy(tmp_path)
    p = root / "shards" / "shard-1.parquet"
    cols = {k: np.array(v) for k, v in read_shard(p, ("image_id", "label", "cls", "tokens")).items()}
    cols["tokens"][40, 2, :] = np.nan
    shards.write_shard(p, cols, toyrun.META, row_group_rows=32)
    pre = Prefetch(ShardStream(root / "shards", 16, columns=["tokens", "cls"], as_torch=True))
    assert not pre._check_finite
    try:
        with pytest.raises(ValueError, match=r"shard-1\.parquet row 40: tokens has 2 non-finite values \(NaN/Inf\)"
                                             r".*snakemake --cores all .*--forcerun \S*shards/shard-1\.parquet"):
            for _ in range(100):
                next(pre)
    finally:
        pre.close()
