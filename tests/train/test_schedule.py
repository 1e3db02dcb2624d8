"""The pure schedule functions: one-cycle, lr-finder sweep, discriminative rates, the lr suggestion."""

import math

import numpy as np
import pytest

from imgtune.train.schedule import (
    auto_epochs,
    discriminative_lrs,
    lr_find_lr,
    one_cycle_lr,
    one_cycle_momentum,
    smooth_losses,
    suggest_lr,
)

PROGRESS = np.linspace(0, 1, 201)


def test_one_cycle_lr_warms_up_to_lr_max_at_pct_start_then_anneals():
    lr_max, pct_start, div, div_final = 1e-2, 0.3, 25.0, 1e5
    lrs = [one_cycle_lr(p, lr_max, pct_start=pct_start, div=div, div_final=div_final) for p in PROGRESS]
    peak = int(np.argmax(lrs))

    assert lrs[0] == pytest.approx(lr_max / div)
    assert PROGRESS[peak] == pytest.approx(pct_start, abs=0.01)
    assert max(lrs) == pytest.approx(lr_max)
    assert one_cycle_lr(pct_start, lr_max, pct_start=pct_start) == pytest.approx(lr_max)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1])), "warm-up is not monotone"
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :])), "annealing is not monotone"
    assert lrs[-1] == pytest.approx(lr_max / div_final)
    assert lrs[-2] < lr_max / 100, "the last steps run near lr_max/div_final"


def test_one_cycle_momentum_is_high_low_at_the_peak_then_high_again():
    moms = [one_cycle_momentum(p, pct_start=0.25) for p in PROGRESS]
    low = int(np.argmin(moms))

    assert moms[0] == pytest.approx(0.95)
    assert PROGRESS[low] == pytest.approx(0.25, abs=0.01)
    assert moms[low] == pytest.approx(0.85)
    assert moms[-1] == pytest.approx(0.95)
    assert all(a >= b for a, b in zip(moms[:low], moms[1 : low + 1]))
    assert all(a <= b for a, b in zip(moms[low:], moms[low + 1 :]))


def test_momentum_moves_inversely_to_the_learning_rate():
    lrs = [one_cycle_lr(p, 1.0) for p in PROGRESS]
    moms = [one_cycle_momentum(p) for p in PROGRESS]
    for i in range(len(PROGRESS) - 1):
        d_lr, d_mom = lrs[i + 1] - lrs[i], moms[i + 1] - moms[i]
        assert d_lr * d_mom <= 1e-15


def test_lr_find_lr_sweeps_exponentially_between_the_endpoints():
    n = 50
    lrs = [lr_find_lr(i, n, start_lr=1e-7, end_lr=10.0) for i in range(n)]

    assert lrs[0] == pytest.approx(1e-7)
    assert lrs[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([ratios[0]] * len(ratios))
    assert ratios[0] == pytest.approx((10.0 / 1e-7) ** (1 / (n - 1)))


def test_discriminative_lrs_scalar_applies_to_every_group():
    assert discriminative_lrs(1e-3, 3) == [1e-3, 1e-3, 1e-3]
    assert discriminative_lrs(2, 1) == [2.0]


def test_discriminative_lrs_pair_is_spread_geometrically_head_last():
    assert discriminative_lrs((1e-6, 1e-4), 3) == pytest.approx([1e-6, 1e-5, 1e-4])
    assert discriminative_lrs([1e-6, 1e-3], 4) == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3])
    assert discriminative_lrs((1e-6, 1e-4), 1) == [1e-4]


def test_discriminative_lrs_refuses_non_positive_rates():
    with pytest.raises(ValueError):
        discriminative_lrs((0.0, 1e-3), 3)


def test_smooth_losses_of_a_constant_is_that_constant():
    # Without bias correction the first values would be pulled towards 0.
    assert smooth_losses([2.5] * 30) == pytest.approx([2.5] * 30)


def test_smooth_losses_is_an_exponential_moving_average():
    beta = 0.9
    losses = [3.0, 1.0, 2.0, 5.0]
    avg, expected = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        expected.append(avg / (1 - beta**i))
    assert smooth_losses(losses, beta=beta) == pytest.approx(expected)
    assert smooth_losses(losses, beta=beta)[0] == pytest.approx(3.0)


def test_centered_smoothing_removes_the_lag_of_the_moving_average():
    ramp = [float(i) for i in range(100)]
    forward = smooth_losses(ramp, beta=0.9)
    centered = smooth_losses(ramp, beta=0.9, centered=True)
    assert forward[50] == pytest.approx(41, abs=1)  # about beta / (1 - beta) steps behind
    assert centered[50] == pytest.approx(50, abs=0.5)
    assert smooth_losses([1.5] * 20, beta=0.9, centered=True) == pytest.approx([1.5] * 20)


def test_auto_epochs_gives_enough_steps_within_bounds():
    assert auto_epochs(100, min_steps=30) == 1
    assert auto_epochs(2, min_steps=30) == 15
    assert auto_epochs(3, min_steps=30, min_epochs=20) == 20
    assert auto_epochs(1, min_steps=1000) == 50
    assert auto_epochs(0, min_steps=10, max_epochs=5) == 5


def u_curve(num_steps: int = 100, *, start: float = 2.5, floor: float = 0.3, best_lr: float = 1e-2):
    """An lr-finder-like curve: falls from ``start`` to ``floor`` at ``best_lr``, then blows up."""
    lrs = [lr_find_lr(i, num_steps) for i in range(num_steps)]
    x = np.log10(lrs) - math.log10(best_lr)
    losses = floor + (start - floor) * np.clip(-x / 5, 0, None) ** 2 + 10 * np.clip(x, 0, None) ** 2
    return lrs, [float(v) for v in losses]


def sigmoid_drop(num_steps: int = 100, *, start: float = 2.5, floor: float = 0.3, centre: float = 1e-3):
    """An lr-finder-like curve: a plateau, a fall centred at ``centre``, a floor, then a blow-up."""
    lrs = [lr_find_lr(i, num_steps) for i in range(num_steps)]
    x = np.log10(lrs) - math.log10(centre)
    losses = floor + (start - floor) / (1 + np.exp(4 * x)) + 20 * np.clip(x - 2, 0, None) ** 2
    return lrs, [float(v) for v in losses]


def test_suggest_lr_minimum_is_the_minimum_divided_by_ten():
    lrs, losses = u_curve()
    i_min = int(np.argmin(losses))

    # beta=0 turns smoothing off, so the minimum is the raw one.
    got = suggest_lr(lrs, losses, beta=0.0)
    assert got["minimum"] == pytest.approx(lrs[i_min] / 10)
    assert lrs[0] <= got["suggested"] <= got["minimum"]


def test_suggest_lr_steepest_is_where_the_loss_falls_fastest_per_decade():
    lrs, losses = sigmoid_drop(centre=1e-4)
    got = suggest_lr(lrs, losses, beta=0.0)
    assert 10**-4.3 < got["steepest"] < 10**-3.7


def test_suggest_lr_on_a_curve_that_falls_more_than_four_fold():
    # A pretrained body fine-tuned on easy data often falls from ~2.5 to ~0.3 before diverging; the
    # divergence cut must compare with the minimum so far, not the overall minimum (which would
    # cut the curve at its first point and suggest start_lr / 10).
    lrs, losses = sigmoid_drop(start=2.5, floor=0.3, centre=1e-3)
    got = suggest_lr(lrs, losses)
    assert 1e-4 < got["steepest"] < 1e-2
    assert 1e-5 < got["minimum"] < 1e-2
    assert 1e-5 < got["suggested"] <= got["minimum"]


def test_suggest_lr_cuts_the_curve_where_it_diverges():
    # After diverging (4x the minimum so far) the loss dips again, lower than before: a dip past the
    # divergence must not be taken as the minimum.
    lrs, losses = u_curve(best_lr=1e-3)
    i_min = int(np.argmin(losses))
    losses = losses[:80] + [0.01] * 20
    assert lrs[80] > lrs[i_min] and losses[79] > 4 * losses[i_min]

    got = suggest_lr(lrs, losses, beta=0.0)
    assert got["minimum"] == pytest.approx(lrs[i_min] / 10)
    assert got["suggested"] <= got["minimum"]
    assert got["steepest"] < lrs[i_min]


def test_suggest_lr_needs_three_points():
    with pytest.raises(ValueError):
        suggest_lr([1e-3, 1e-2], [1.0, 0.9])


def test_the_head_on_features_follows_the_minimum_unless_the_loss_kept_falling():
    from imgtune.train.schedule import head_on_features_lr

    assert head_on_features_lr({"minimum": 2e-3, "valley": 4e-4}) == 2e-3  # a real minimum
    assert head_on_features_lr({"minimum": 1.0, "valley": 3e-3}) == 3e-3  # memorised: the loss fell to the end
    assert head_on_features_lr({"minimum": 1e-4, "valley": 3e-4}) == 1e-4


def test_lr_find_on_cached_features_measures_a_fixed_sample(tiny_learner):
    result = tiny_learner.lr_find(num_steps=30)
    assert tiny_learner.features is not None and len(result.losses) == len(result.lrs) > 3
    from imgtune.train.schedule import head_on_features_lr

    assert result.suggested == head_on_features_lr(result.suggestion)
    # The probe loss is measured on the same sample each step: with a tiny rate it barely moves.
    assert max(result.losses[:5]) - min(result.losses[:5]) < 1e-3


def test_one_cycle_gives_every_group_its_rate_and_the_momentum():
    from imgtune.train.schedule import one_cycle

    for progress in (0.0, 0.1, 0.25, 0.6, 1.0):
        rates, momentum = one_cycle(progress, [1e-4, 1e-3, 1e-2], pct_start=0.3, div=5.0, div_final=1e4,
                                    moms=(0.9, 0.8, 0.9))
        assert rates == [one_cycle_lr(progress, lr, pct_start=0.3, div=5.0, div_final=1e4) for lr in (1e-4, 1e-3, 1e-2)]
        assert momentum == one_cycle_momentum(progress, moms=(0.9, 0.8, 0.9), pct_start=0.3)


# Fixed values worked out by hand, so that a broken schedule cannot agree with itself. With lr_max = 1,
# div = 25 and div_final = 1e5 the warm-up runs from 0.04 to 1 and the annealing from 1 to 1e-5; the
# momentum runs 0.95 -> 0.85 -> 0.95. cosine(a, b, t) = b + (a - b) / 2 * (1 + cos(pi t)), so at
# t = 1/4, 1/3, 1/2, 3/4 the factor (1 + cos(pi t)) / 2 is (1 + sqrt(2)/2) / 2, 3/4, 1/2, (1 - sqrt(2)/2) / 2.
# Columns: progress, lr, momentum.
ONE_CYCLE_BY_HAND = {
    0.3: [  # fine_tune's unfrozen phase
        (0.0, 0.04, 0.95),
        (0.1, 0.28, 0.925),  # t = 1/3 of the warm-up: 1 - 0.96 * 3/4; 0.85 + 0.1 * 3/4
        (0.15, 0.52, 0.90),  # t = 1/2: 1 - 0.96 / 2; 0.85 + 0.1 / 2
        (0.3, 1.0, 0.85),  # the peak
        (0.65, 0.500005, 0.90),  # t = 1/2 of the annealing: 1e-5 + (1 - 1e-5) / 2
        (0.825, 0.1464551449406324, 0.9353553390593274),  # t = 3/4: 1e-5 + (1 - 1e-5)(1 - sqrt(2)/2)/2
        (1.0, 1e-5, 0.95),
    ],
    0.99: [  # fine_tune's frozen phase
        (0.0, 0.04, 0.95),
        (0.33, 0.28, 0.925),
        (0.495, 0.52, 0.90),
        (0.99, 1.0, 0.85),
        (0.995, 0.500005, 0.90),
        (1.0, 1e-5, 0.95),
    ],
    0.25: [  # the default
        (0.0, 0.04, 0.95),
        (0.0625, 0.1805887450304572, 0.9353553390593274),  # t = 1/4: 1 - 0.96 (1 + sqrt(2)/2) / 2
        (0.125, 0.52, 0.90),
        (0.25, 1.0, 0.85),
        (0.625, 0.500005, 0.90),
        (1.0, 1e-5, 0.95),
    ],
}


@pytest.mark.parametrize("pct_start", sorted(ONE_CYCLE_BY_HAND))
def test_one_cycle_matches_values_worked_out_by_hand(pct_start):
    for progress, lr, momentum in ONE_CYCLE_BY_HAND[pct_start]:
        where = f"pct_start={pct_start}, progress={progress}"
        assert one_cycle_lr(progress, 1.0, pct_start=pct_start) == pytest.approx(lr, rel=1e-9), where
        assert one_cycle_momentum(progress, pct_start=pct_start) == pytest.approx(momentum, rel=1e-9), where


@pytest.mark.parametrize("pct_start", [0.3, 0.99])
def test_one_cycle_passes_pct_start_to_the_momentum_too(pct_start):
    from imgtune.train.schedule import one_cycle

    for progress, lr, momentum in ONE_CYCLE_BY_HAND[pct_start]:
        rates, beta1 = one_cycle(progress, [1.0, 0.5], pct_start=pct_start)
        assert rates == pytest.approx([lr, lr / 2], rel=1e-9) and beta1 == pytest.approx(momentum, rel=1e-9)
