"""The evaluation protocol shared by single-label and multi-label evaluation (medclf.evaluation.protocol)."""

from __future__ import annotations

import numpy as np
import pytest

from medclf.errors import DataError
from medclf.evaluation.protocol import COPIES_KEPT, PROTOCOL, protocol_fields, split_rows

SPLITS = ["train", "test", "test", "test", "test", "test"]
OK = np.array([True, True, False, True, True, True])  # sample 2 unreadable
SCORABLE = OK & np.array([True, True, True, True, True, False])  # sample 5 unlabelled
COPY = np.array([True, False, False, True, False, False])  # sample 3 copies a training sample
PROBS = np.array([[0.5, 0.5]] * 6)


def test_the_headline_leaves_out_copies_and_all_samples_keeps_them():
    probs = PROBS.copy()
    probs[4] = np.nan  # not predicted
    rows = split_rows(SPLITS, "test", SCORABLE, probs, COPY, False)
    assert rows.idx.tolist() == [1, 2, 3, 4, 5]
    assert rows.usable.tolist() == [1, 3] and rows.clean.tolist() == [1] and rows.n_removed == 1
    assert protocol_fields(rows, OK, False) == {
        "n_removed_duplicates": 1,
        "n_train_copies_in_split": 1,
        "n_unreadable": 1,
        "protocol": PROTOCOL,
    }
    kept = split_rows(SPLITS, "test", SCORABLE, probs, COPY, True)
    assert kept.clean.tolist() == [1, 3] and kept.n_removed == 0
    assert protocol_fields(kept, OK, True)["protocol"] == COPIES_KEPT


def test_a_split_of_nothing_but_copies_is_refused():
    only_copies = np.array([True, False, False, True, False, False])
    with pytest.raises(DataError, match="no usable samples in split 'test'"):
        split_rows(SPLITS, "test", only_copies, PROBS, COPY, False)
