"""The sweep report's paired difference (rdcore.stats, used by bench/paper_table.py) and the
per-row scores it reads (rdcore.evaluate.row_score), on hand-computed numbers. Fast: no model."""

import pytest

from rdcore.evaluate import VADER_THRESHOLD, row_score
from rdcore.stats import paired_difference, seed_difference


def bob(values: list[float], env_rows: int) -> dict[int, tuple[str, str, float]]:
    return {i: ("adherence", "negative_env" if i < env_rows else "positive_other", v)
            for i, v in enumerate(values)}


def test_rows_are_averaged_over_seeds_then_differenced_per_group():
    # 4 environmental rows, 2 others; two seeds per method
    method = [bob([1, 1, 0, 0, 1, 0], 4), bob([1, 0, 0, 0, 1, 1], 4)]
    ref = [bob([0, 0, 0, 0, 1, 1], 4), bob([0, 0, 1, 0, 0, 1], 4)]
    diff, se, n = paired_difference(method, ref)
    # per-row differences: env [1, .5, -.5, 0] (mean .25), other [.5, -.5] (mean 0)
    assert diff == pytest.approx(0.125)  # = adherence .5625 − .4375
    assert se == pytest.approx((1.25 / 3 / 4 + 0.5 / 1 / 2) ** 0.5 / 2)
    assert n == 6


def test_only_rows_every_evaluation_has_are_paired():
    method = [{0: ("m", "all", 1.0), 1: ("m", "all", 1.0), 2: ("m", "all", 0.0)}]
    ref = [{1: ("m", "all", 0.0), 2: ("m", "all", 1.0), 3: ("m", "all", 1.0)}]
    diff, se, n = paired_difference(method, ref)
    assert (diff, n) == (0.0, 2)  # rows 1 and 2: +1 and −1
    assert se == pytest.approx(2 ** 0.5 / 2 ** 0.5)  # variance 2, two rows
    one = paired_difference([{0: ("m", "all", 1.0)}], [{0: ("m", "all", 0.0)}])
    assert one[0] == 1.0 and one[1] != one[1]  # one row: no standard error (NaN), never 0


def test_seed_difference_is_the_spread_of_the_seeds_own_differences():
    # two seeds whose own paired differences are +0.5 and 0.0 (all rows in one group)
    method = [{0: ("m", "all", 1.0), 1: ("m", "all", 1.0)}, {0: ("m", "all", 0.0), 1: ("m", "all", 1.0)}]
    ref = [{0: ("m", "all", 0.0), 1: ("m", "all", 1.0)}, {0: ("m", "all", 0.0), 1: ("m", "all", 1.0)}]
    diff, se, s = seed_difference(method, ref)
    assert (diff, s) == (pytest.approx(0.25), 2)
    assert se == pytest.approx(0.5 / 2 ** 0.5 / 2 ** 0.5)  # stdev(0.5, 0) / √2
    assert diff == pytest.approx(paired_difference(method, ref)[0])  # same mean, other SE
    one = seed_difference(method[:1], ref[:1])
    assert one[0] == 0.5 and one[1] != one[1] and one[2] == 1  # one seed: no SE (NaN)


def test_row_score_matches_the_documented_metrics():
    t = VADER_THRESHOLD
    assert row_score("bob", "test", {"vader_compound": -t, "environmental": True}) == \
        ("adherence", "negative_env", 1.0)
    assert row_score("bob", "test", {"vader_compound": t - 1e-3, "environmental": False}) == \
        ("adherence", "positive_other", 0.0)
    assert row_score("math", "test_ood", {"correct": True}) == ("exact_match", "all", 1.0)
    assert row_score("jailbreak", "harmful_test", {"refusal": True}) == ("refusal_rate", "all", 1.0)
    assert row_score("jailbreak", "helpful_test", {"refusal": True}) == ("helpful_rate", "all", 0.0)
