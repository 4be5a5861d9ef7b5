"""Learning vs forgetting matched along trajectories, on synthetic curves whose answers are known in closed form."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from lora_jax.app.demo import frontier as F


def line(method, *, slope, steps=5, drop=0.1, seed=0, lr=None, start=(2.0, 1.0), shift=0.0):
    """A run whose target loss falls by ``drop`` per evaluation while its source loss rises ``slope`` times as much
    (plus ``shift`` after step 0): its forgetting at target loss ``L`` is ``shift + slope * (start - L)`` wherever
    it reached ``L``, and undefined below its last point."""
    k = np.arange(steps + 1)
    target = start[0] - drop * k
    source = start[1] + slope * drop * k + shift * (k > 0)
    return F.Trajectory.from_curve(method, np.stack([10 * k, target, source], axis=1), seed=seed, lr=lr)


def test_forgetting_at_interpolates_linearly_between_evaluations():
    t = line("x", slope=0.5)
    for level in (1.95, 1.83, 1.7, 1.51):
        assert t.forgetting_at(level) == pytest.approx(0.5 * (2.0 - level), abs=1e-12)
    assert t.forgetting_at(2.0) == 0.0 and t.deepest == pytest.approx(1.5)
    assert np.isnan(t.forgetting_at(1.49))          # below the last point: never extrapolated


def test_forgetting_at_takes_the_first_time_the_level_is_reached():
    # the target loss dips to 1.6, recovers to 1.9, then falls to 1.4; source rises 0.1 per evaluation
    t = F.Trajectory.from_curve("x", [(0, 2.0, 1.0), (1, 1.6, 1.1), (2, 1.9, 1.2), (3, 1.4, 1.3)])
    assert t.forgetting_at(1.7) == pytest.approx(0.075)    # 3/4 of the way to step 1
    assert t.forgetting_at(1.5) == pytest.approx(0.3 - 0.1 * 0.2)   # on the segment 1.9 -> 1.4, 4/5 of the way


def test_a_diverged_run_keeps_the_evaluations_before_the_first_non_finite_one():
    t = F.Trajectory.from_curve("x", [(0, 2.0, 1.0), (1, 1.5, 1.5), (2, np.nan, 1.7), (3, 1.0, 2.0)])
    assert t.steps.tolist() == [0, 1] and t.deepest == 1.5
    with pytest.raises(ValueError, match="no finite evaluations"):
        F.Trajectory.from_curve("x", [(0, np.inf, 1.0)])


def test_compare_matches_at_the_deepest_common_level_and_says_who_learned_more():
    lora = line("LoRA", slope=0.4, steps=3)        # reaches 1.7
    full = line("full", slope=0.8, steps=6)        # reaches 1.4
    c = F.compare(F.group([lora, full]), "LoRA", "full")
    assert c.level == pytest.approx(1.7)
    assert c.forgot_a == pytest.approx([0.4 * 0.3]) and c.forgot_b == pytest.approx([0.8 * 0.3])
    assert c.outcome == "one seed"
    text = c.sentence("code", "prose")
    assert "At equal code loss (1.700 nats/byte" in text
    assert "LoRA forgot 0.120 nats/byte less prose than full (LoRA +0.120, full +0.240)" in text
    assert "one seed, so seed noise is not measured" in text
    assert "Full learned more in the same steps (lowest code loss 1.400 vs 1.700); below 1.700 the runs of LoRA " \
           "have no points" in text


def test_curves_that_never_reach_the_same_loss_are_not_compared():
    learns = line("A", slope=0.5)
    worsens = line("B", slope=0.5, drop=-0.1)       # its target loss only rises
    c = F.compare(F.group([learns, worsens]), "A", "B")
    assert c.level is None and c.outcome == "unmatched" and len(c.forgot_a) == 0
    text = c.sentence("code", "prose")
    assert text.startswith("No common level of learning: B did not bring the code loss below its start (2.000)")
    assert "nothing is extrapolated" in text and "Lowest code loss: A 1.500, B 2.000." in text
    assert "forgot" not in text.replace("forgetting", "")


def test_levels_table_says_not_reached_instead_of_extrapolating():
    runs = [line("A", slope=0.5, steps=2), line("B", slope=1.0, steps=4)]
    table = F.levels_table(F.group(runs), ["A", "B"], n=4).splitlines()
    assert table[2:] == ["| 1.900 | 0.100 | +0.050 | +0.100 |", "| 1.800 | 0.200 | +0.100 | +0.200 |",
                         "| 1.700 | 0.300 | not reached | +0.300 |", "| 1.600 | 0.400 | not reached | +0.400 |"]


def seeds(method, slopes, **kw):
    return [line(method, slope=s, seed=i, **kw) for i, s in enumerate(slopes)]


def test_a_difference_beyond_seed_noise_needs_ranges_that_do_not_overlap():
    lora, full = seeds("LoRA", (0.3, 0.4, 0.5)), seeds("full", (0.6, 0.7, 0.9))
    c = F.compare(F.group(lora + full), "LoRA", "full")
    assert c.level == pytest.approx(1.5)
    assert c.difference == pytest.approx([-0.15, -0.15, -0.2]) and c.outcome == "less"
    text = c.sentence("code", "prose")
    assert "LoRA forgot 0.167 nats/byte less prose than full (mean of 3 seeds; per seed -0.200 to -0.150): " \
           "beyond seed noise (their ranges over seeds do not overlap: LoRA 0.150 to 0.250, full 0.300 to 0.450)" \
           in text
    overlapping = seeds("full", (0.45, 0.7, 0.9))     # one seed of full forgets less than LoRA's worst
    c = F.compare(F.group(lora + overlapping), "LoRA", "full")
    assert c.outcome == "within noise" and "no difference beyond seed noise (their ranges over seeds overlap" \
        in c.sentence()


def test_the_noise_rule_passes_by_chance_with_probability_two_in_twenty_for_three_seeds():
    # the module docstring's number: of the C(6, 3) ways to deal 6 distinct values to two methods, 2 separate them
    values = np.arange(6.0)
    splits = [np.array(a) for a in itertools.combinations(values, 3)]
    apart = [F.beyond_noise(a, np.setdiff1d(values, a)) for a in splits]
    assert len(splits) == 20 and sum(apart) == 2


def test_seeds_must_pair_up():
    runs = seeds("A", (0.1, 0.2)) + seeds("B", (0.1,))
    with pytest.raises(ValueError, match="seeds"):
        F.compare(F.group(runs), "A", "B")


def test_the_frontier_takes_the_least_forgetting_over_learning_rates_that_reached_the_level():
    slow = line("LoRA", slope=0.2, steps=2, lr=1e-3)      # forgets little, reaches only 1.8
    fast = line("LoRA", slope=0.6, steps=8, lr=1e-2)      # forgets more, reaches 1.2
    assert F.frontier_at([slow, fast], 1.9) == pytest.approx(0.02)
    assert F.frontier_at([slow, fast], 1.5) == pytest.approx(0.3)
    full = line("full", slope=1.0, steps=5)               # reaches 1.5
    c = F.compare(F.group([slow, fast, full]), "LoRA", "full")
    assert c.level == pytest.approx(1.5) and c.forgot_a == pytest.approx([0.3]) and c.forgot_b == pytest.approx([0.5])


def test_reach_verdict_names_who_reached_the_goal_and_what_it_cost():
    runs = (seeds("r=1", (0.2, 0.25), steps=2) + seeds("r=4", (0.3, 0.35), steps=6)
            + seeds("r=16", (0.5, 0.6), steps=6))
    groups = F.group(runs)
    text = F.reach_verdict(groups, ["r=1", "r=4", "r=16"], 1.6, "the goal", target="code")
    assert text.startswith("At the goal (1.600 nats/byte): r=4 reached it and forgot +0.130 (0.120 to 0.140, "
                           "2 seeds); r=16 reached it and forgot +0.220 (0.200 to 0.240, 2 seeds) there.")
    assert "Least forgetting: r=4, 0.090 nats/byte less than r=16 (beyond seed noise)." in text
    assert text.endswith("Did not reach it in every seed: r=1 (lowest code loss 1.800).")
    above = F.reach_verdict(groups, ["r=1"], 2.1, "the goal")
    assert above == "The goal (2.100 nats/byte) is not below the start (2.000): there is no learning to match " \
                    "there, so nothing is compared at it."
    assert F.reach_verdict(groups, ["r=4"], 1.0, "the goal", target="code") == \
        "At the goal (1.000 nats/byte): no run reached it. Did not reach it in every seed: r=4 (lowest code loss 1.400)."


def test_numbers_in_a_sentence_are_the_ones_measured():
    lora, full = seeds("LoRA", (0.31, 0.37, 0.34), steps=4), seeds("full", (0.52, 0.45, 0.58), steps=3)
    c = F.compare(F.group(lora + full), "LoRA", "full")
    numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d{3}", c.sentence())]
    expected = [c.level, abs(np.mean(c.difference)), np.min(c.difference), np.max(c.difference),
                *np.sort(c.forgot_a)[[0, -1]], *np.sort(c.forgot_b)[[0, -1]]]
    assert numbers[:len(expected)] == pytest.approx(np.round(expected, 3), abs=1e-12)
    assert c.level == pytest.approx(1.7) and c.forgot_a == pytest.approx(0.3 * np.array([0.31, 0.37, 0.34]))
