"""Cross-validation splits: the disjoint scheme and an exact reproduction of NVIDIA UNet_Medical's."""
import pytest

from unet.data.folds import fold_indices
from unet.errors import UserError


def test_no_fold_trains_on_everything():
    assert fold_indices(30, None) == (list(range(30)), [])
    assert fold_indices(7, None, scheme="nvidia") == (list(range(7)), [])


@pytest.mark.parametrize("n,folds", [(30, 5), (31, 5), (10, 3), (5, 5)])
def test_disjoint_validates_every_slice_once(n, folds):
    vals = []
    for f in range(folds):
        train, val = fold_indices(n, f, folds=folds, seed=3)
        assert sorted(train + val) == list(range(n)) and not set(train) & set(val)
        assert len(val) in (n // folds, -(-n // folds))
        vals += val
    assert sorted(vals) == list(range(n))


def test_disjoint_depends_on_seed_only():
    assert fold_indices(30, 2, seed=1) == fold_indices(30, 2, seed=1)
    assert fold_indices(30, 2, seed=1)[1] != fold_indices(30, 2, seed=2)[1]


def test_nvidia_known_answers():
    train0, val0 = fold_indices(30, 0, scheme="nvidia")
    assert val0 == [25, 3, 0, 21, 15, 12]
    assert train0[:5] == [2, 28, 13, 10, 26] and len(train0) == 24
    assert fold_indices(30, 1, scheme="nvidia")[1] == [4, 18, 19, 9, 7, 25]
    assert fold_indices(30, 4, scheme="nvidia")[1] == [26, 24, 27, 11, 17, 22]


def test_nvidia_folds_overlap_and_miss_slices():
    vals = [fold_indices(30, f, scheme="nvidia")[1] for f in range(5)]
    for train, val in (fold_indices(30, f, scheme="nvidia") for f in range(5)):
        assert sorted(train + val) == list(range(30))
    assert set(vals[0]) & set(vals[1]) == {25}
    assert sorted(set(range(30)) - set().union(*vals)) == [2, 10, 13, 28]


def test_fold_out_of_range_and_bad_scheme():
    with pytest.raises(UserError, match=r"--fold 5 is out of range; use 0 to 4"):
        fold_indices(30, 5)
    with pytest.raises(UserError, match=r"--fold -1 is out of range"):
        fold_indices(30, -1, folds=3)
    with pytest.raises(UserError, match=r"--fold 5 is out of range; the nvidia scheme has folds 0 to 4"):
        fold_indices(30, 5, scheme="nvidia")
    with pytest.raises(UserError, match=r"--folds 6 is not possible with 4 slices"):
        fold_indices(4, 0, folds=6)
    with pytest.raises(UserError, match=r"--fold-scheme 'kfold' is not known; use one of disjoint, nvidia"):
        fold_indices(30, 0, scheme="kfold")
