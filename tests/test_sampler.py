from sasi_online.data.sampler import StepSampler


def test_each_epoch_covers_distinct_images_split_across_trainers():
    s = StepSampler(dataset_size=50, batch_size=4, num_trainers=3, seed=1)
    assert s.steps_per_epoch == 4
    seen = [i for step in range(4) for r in range(3) for i in s.indices(step, r)]
    assert len(seen) == len(set(seen)) == 48
    assert s.indices(0, 0) != s.indices(4, 0)  # a new permutation next epoch


def test_pure_function_of_seed_and_step():
    a = StepSampler(100, 8, 2, seed=3)
    b = StepSampler(100, 8, 2, seed=3)
    assert [a.indices(k, 1) for k in range(20)] == [b.indices(k, 1) for k in range(20)]
    assert StepSampler(100, 8, 2, seed=4).indices(0, 0) != a.indices(0, 0)
    up = a.upcoming(5, 2)
    assert [i for (st, r, i) in up if st == 6 and r == 1] == a.indices(6, 1)


def test_empty_batches_are_refused_by_name():
    import pytest

    from sasi_online.errors import UserInputError

    with pytest.raises(UserInputError, match="train.batch_size"):
        StepSampler(100, 0, 1)
    with pytest.raises(UserInputError, match="lower train.batch_size"):
        StepSampler(10, 8, 2)
