"""Global batches are a function of (seed, step), not of the number of ranks.
    pytest -q tests/test_sampler.py"""

import pytest

from flux_lora.training.batches import GlobalBatchSampler

BUCKETS = [(64, 64)] * 7 + [(80, 48)] * 5 + [(48, 80)] * 1


def test_same_items_for_any_world_size():
    s = GlobalBatchSampler(BUCKETS, global_batch=4, seed=3)
    for step in range(12):
        full = [i for sl in s.rank_slices(step, 0, 1, 4) for i in sl.items]
        by_rank = {}
        for world, bs in ((2, 2), (4, 1)):
            got = {}
            for r in range(world):
                for sl in s.rank_slices(step, r, world, bs):
                    got.update(dict(zip(sl.positions, sl.items)))
            by_rank[world] = [got[j] for j in range(4)]
        accum = {}
        for sl in s.rank_slices(step, 0, 1, 2):  # batch 2 × 2 accumulation steps
            accum.update(dict(zip(sl.positions, sl.items)))
        assert by_rank[2] == by_rank[4] == full == [accum[j] for j in range(4)]


def test_one_bucket_per_batch_and_no_item_twice_across_ranks():
    s = GlobalBatchSampler(BUCKETS, global_batch=4, seed=0)
    for step in range(s.batches_per_epoch):
        batch = s.global_batch_at(step)
        assert len({BUCKETS[i] for i in batch}) == 1
        if BUCKETS[batch[0]] != (48, 80):  # a bucket smaller than the batch must repeat
            assert len(set(batch)) == 4


def test_epoch_covers_every_item_and_reshuffles():
    s = GlobalBatchSampler(BUCKETS, global_batch=4, seed=0)
    epoch0 = [i for k in range(s.batches_per_epoch) for i in s.global_batch_at(k)]
    assert set(epoch0) == set(range(len(BUCKETS)))
    epoch1 = [i for k in range(s.batches_per_epoch) for i in s.global_batch_at(s.batches_per_epoch + k)]
    assert epoch0 != epoch1
    assert GlobalBatchSampler(BUCKETS, 4, 0).global_batch_at(5) == s.global_batch_at(5)  # resumable from the step


def test_dataset_smaller_than_batch_repeats():
    s = GlobalBatchSampler([(64, 64)] * 2, global_batch=8, seed=0)
    assert sorted(set(s.global_batch_at(0))) == [0, 1] and len(s.global_batch_at(0)) == 8


def test_prefetcher_returns_each_step_in_order_and_surfaces_errors():
    from flux_lora.training.batches import Prefetcher

    calls = []

    def load(step):
        calls.append(step)
        if step == 3:
            raise ValueError("corrupt shard")
        return step * 10

    p = Prefetcher(load, end_step=4)
    try:
        assert [p.get(s) for s in range(3)] == [0, 10, 20]
        with pytest.raises(ValueError, match="corrupt"):
            p.get(3)
    finally:
        p.close()
    assert sorted(calls) == [0, 1, 2, 3]  # each step loaded once, the next one ahead of time
