import pytest
import torch

from masked_dit.data import BatchStream, DigitsDataset, ResumableBatchSampler, load_digits_tensor


def test_digits_are_real_fixed_and_split():
    x, y = load_digits_tensor("train", 16)
    xh, yh = load_digits_tensor("heldout", 16)
    assert x.shape == (1500, 1, 16, 16) and xh.shape == (297, 1, 16, 16)
    assert x.min() >= -1 and x.max() <= 1 and x.dtype == torch.float32
    assert set(y.tolist()) == set(range(10)) and set(yh.tolist()) == set(range(10))
    x2, y2 = load_digits_tensor("train", 16)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # the split is fixed
    # train and held-out images are disjoint (no image in both)
    flat = {tuple(v.tolist()) for v in load_digits_tensor("train", 8)[0].flatten(1)}
    overlap = sum(tuple(v.tolist()) in flat for v in load_digits_tensor("heldout", 8)[0].flatten(1))
    assert overlap < 5  # a handful of identical scans exist in sklearn's digits; splits do not share indices
    assert load_digits_tensor("all", 32)[0].shape == (1797, 1, 32, 32)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="valid: train, heldout, all"):
        load_digits_tensor("test")
    with pytest.raises(ValueError, match="image_size must be one of"):
        DigitsDataset("train", 24)


def test_ranks_partition_each_global_batch():
    s0 = iter(ResumableBatchSampler(100, 5, rank=0, world=2, seed=3))
    s1 = iter(ResumableBatchSampler(100, 5, rank=1, world=2, seed=3))
    seen = []
    for _ in range(10):  # one epoch = 10 global batches of 10
        seen += [i for i, _ in next(s0)] + [i for i, _ in next(s1)]
    assert sorted(seen) == list(range(100))


def test_stream_resumes_at_its_position():
    ds = DigitsDataset("train", 8)
    a = BatchStream(ds, 64, seed=1)
    batches = [next(a) for _ in range(30)]  # crosses an epoch boundary (23 batches per epoch)
    b = BatchStream(ds, 64, seed=1)
    for _ in range(12):
        next(b)
    c = BatchStream(ds, 64, seed=1, state=b.state_dict())
    for i in range(12, 30):
        assert torch.equal(next(c)["x"], batches[i]["x"])


class _Ids(torch.utils.data.Dataset):  # item = its own index
    def __init__(self, n=100):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        return key[0]


def _steps(micro, world, accum, n, state=None):
    """The sorted samples of ``n`` optimizer steps (global batch micro x world x accum)."""
    streams = [BatchStream(_Ids(), micro, rank=r, world=world, accum=accum, seed=3, state=state) for r in range(world)]
    steps = [sorted(i for _ in range(accum) for s in streams for i in next(s).tolist()) for _ in range(n)]
    return steps, streams[0].state_dict()


def test_resume_with_another_batch_geometry_keeps_the_sample_position():
    """Checkpointed at 12 samples into the epoch in batches of 4; resumed in batches of 2 (or 2 ranks
    x 3) the stream continues at sample 12; batches of 5 continue at 10, with a warning."""
    order = ResumableBatchSampler(100, 1, seed=3).epoch_keys(0)[0].tolist()
    a = BatchStream(_Ids(), 4, seed=3)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    assert state == {"epoch": 0, "batch": 3, "samples_per_batch": 4, "dataset_len": 100}
    assert next(BatchStream(_Ids(), 2, seed=3, state=state)).tolist() == order[12:14]
    ranks = [BatchStream(_Ids(), 3, rank=r, world=2, seed=3, state=state) for r in range(2)]
    assert [next(r).tolist() for r in ranks] == [order[12:15], order[15:18]]
    with pytest.warns(UserWarning, match="repeats 2 of them"):
        five = BatchStream(_Ids(), 5, seed=3, state=state)
    assert next(five).tolist() == order[10:15]
    old = BatchStream(_Ids(), 4, seed=3, state={"epoch": 0, "batch": 3})  # checkpoints of before
    assert next(old).tolist() == order[12:16]


def test_step_samples_do_not_depend_on_the_micro_batch_split():
    """A global batch of 12 over 100 samples: 8 whole steps per epoch, whatever the split into micro-batches,
    ranks and accumulation; no step straddles an epoch (so none holds a sample twice). Before, accumulation
    counted the epoch in micro-batches (micro 3 x 2 ranks x accum 2: 16 positions, 8 steps; micro 3 x 1 x 4:
    33 positions, 8.25 steps), so the splits drew different samples from the second epoch on."""
    order = [ResumableBatchSampler(100, 1, seed=3).epoch_keys(e)[0].tolist() for e in range(3)]
    want = [sorted(order[s // 8][(s % 8) * 12:(s % 8 + 1) * 12]) for s in range(20)]
    for micro, world, accum in [(12, 1, 1), (6, 1, 2), (3, 1, 4), (3, 2, 2), (2, 3, 2), (1, 2, 6)]:
        assert _steps(micro, world, accum, 20)[0] == want, (micro, world, accum)


def test_resume_with_another_split_of_the_same_global_batch_is_exact():
    """Checkpointed after 5 steps in micro-batches of 12, resumed as 3 x accum 4, then as 3 x 2 ranks x 2:
    the next steps, across the epoch boundary, are the uninterrupted run's, without a warning."""
    import warnings
    whole, _ = _steps(12, 1, 1, 14)
    _, state = _steps(12, 1, 1, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed, state2 = _steps(3, 1, 4, 5, state=state)
        again, _ = _steps(3, 2, 2, 4, state=state2)
    assert resumed == whole[5:10] and again == whole[10:14]


def test_dataset_smaller_than_a_step_with_accumulation():
    with pytest.raises(ValueError, match=r"smaller than one global batch \(5 x 2 ranks x 3 accumulation steps\)"):
        ResumableBatchSampler(20, 5, world=2, accum=3)


def test_resume_on_a_dataset_of_another_size_warns():
    """Images added to (or removed from) the folder between save and resume: the position is kept but
    the epoch's shuffle is another one, so samples of this epoch repeat or are missed; said, not silent."""
    a = BatchStream(_Ids(100), 4, seed=3)
    next(a)
    with pytest.warns(UserWarning, match="the dataset has 120 samples, the run was saved with 100"):
        BatchStream(_Ids(120), 4, seed=3, state=a.state_dict())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BatchStream(_Ids(100), 4, seed=3, state=a.state_dict())


def test_random_flip_is_seeded():
    ds = DigitsDataset("train", 8)
    keys = next(iter(ResumableBatchSampler(len(ds), 32, seed=0, random_flip=True)))
    assert any(f for _, f in keys) and not all(f for _, f in keys)
    i, _ = keys[0]
    assert torch.equal(ds[(i, True)]["x"], ds[i]["x"].flip(-1))


def test_dataset_smaller_than_a_batch():
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ResumableBatchSampler(10, 8, world=2)
