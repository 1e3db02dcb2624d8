"""Window predictions combined into one score per session."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imgtune.errors import ImgtuneError
from imgtune.sequences.groups import aggregate_windows


def test_session_aggregation_matches_a_hand_computation():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    scores = aggregate_windows(probs, ["s1", "s1", "s2"], ["a", "b", "c"])
    assert scores.groups == ["s1", "s2"] and scores.counts.tolist() == [2, 1]
    mean_log = [(math.log(0.7) + math.log(0.5)) / 2, (math.log(0.2) + math.log(0.25)) / 2,
                (math.log(0.1) + math.log(0.25)) / 2]
    assert np.allclose(scores.log_probs[0], mean_log)
    geometric = np.sqrt([0.7 * 0.5, 0.2 * 0.25, 0.1 * 0.25])
    assert np.allclose(scores.probs[0], geometric / geometric.sum())
    assert np.allclose(scores.probs[1], [0.1, 0.1, 0.8])
    assert np.allclose(scores.prob_of(["b", "c"]), [geometric[1] / geometric.sum(), 0.8])
    with pytest.raises(ImgtuneError, match="not one of"):
        scores.prob_of(["z", "a"])
