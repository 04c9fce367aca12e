#!/usr/bin/python3
"""The claim's arithmetic (bench/claim_page.py) on hand-computed examples: which points
form a front, and the KV size at which a front reaches a quality (log-linear between
neighbours, a bound below the front's smallest point, nothing beyond its best)."""

import math
import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from claim_page import at_decode_mean, front, glance, ratios, size_at, variant_rows  # noqa: E402


def point(kv, kl):
    return {"kv": kv, "kl": kl}


class Front(unittest.TestCase):
    def test_dominated_points_leave_the_front(self):
        a, b, c, d = point(10, 0.05), point(20, 0.01), point(15, 0.06), point(20, 0.02)
        self.assertEqual(front([c, b, a, d], "kl"), [a, b])  # c: bigger and worse than a; d: worse than b

    def test_missing_quality_is_ignored(self):
        self.assertEqual(front([point(10, None), point(12, 0.1)], "kl"), [point(12, 0.1)])


class SizeAt(unittest.TestCase):
    points = [point(10, 0.04), point(40, 0.01)]

    def test_log_linear_between_neighbours(self):
        # Quality 0.025 is halfway from 0.04 to 0.01: halfway in log size, sqrt(10 * 40) = 20.
        size, reached = size_at(self.points, "kl", 0.025)
        self.assertAlmostEqual(size, 20.0)
        self.assertIs(reached, self.points[1])
        self.assertAlmostEqual(size_at(self.points, "kl", 0.01)[0], 40.0)

    def test_better_than_the_smallest_point_is_a_bound(self):
        self.assertEqual(size_at(self.points, "kl", 0.05), ("below", self.points[0]))

    def test_beyond_the_best_point_is_not_reached(self):
        self.assertEqual(size_at(self.points, "kl", 0.005), (None, None))
        self.assertEqual(size_at([], "kl", 0.1), (None, None))

    def test_three_points(self):
        points = [point(5, 0.1), point(10, 0.04), point(40, 0.01)]
        size, _ = size_at(points, "kl", 0.07)
        self.assertAlmostEqual(size, math.exp((math.log(5) + math.log(10)) / 2))

class Variants(unittest.TestCase):
    def test_a_variant_adds_to_the_claims_front_only_when_its_rule_says_so(self):
        plain, extra = point(10, 0.05), point(25, 0.001)
        by_method = {"Lexico": [plain], "Lexico residual": [extra], "Lexico other": [extra]}
        claim = {"variants": {"Lexico residual": {"adds_to_claim_front": True}, "Lexico other": {}}}
        self.assertEqual(variant_rows(claim, "Lexico residual", by_method), [extra, plain])
        self.assertEqual(variant_rows(claim, "Lexico other", by_method), [extra])
        self.assertEqual(front(variant_rows(claim, "Lexico residual", by_method), "kl"), [plain, extra])


class DecodeMeanSizes(unittest.TestCase):
    def test_the_ratio_follows_the_size_the_rows_are_read_at(self):
        # Lexico ends its windows with an empty buffer (end 10 %, mean 12 %); the baseline
        # point ends at 24 %, mean 26 %. Same quality, so the ratio is 24/10 at the end and
        # 26/12 over the decode steps; the rows themselves are left as they were.
        lexico = [{"kv": 10.0, "kv_mean": 12.0, "kl": 0.01, "delta": 0.01},
                  {"kv": 20.0, "kv_mean": 21.0, "kl": 0.001, "delta": 0.001}]
        baseline = {"kv": 24.0, "kv_mean": 26.0, "kl": 0.01, "delta": 0.01}
        (by_kl, by_delta), = ratios([baseline], lexico)
        self.assertAlmostEqual(by_kl[0], 2.4)
        self.assertTrue(by_kl[2])  # Lexico's smallest point is already as good: a bound
        (by_kl, _), = ratios(at_decode_mean([baseline]), at_decode_mean(lexico))
        self.assertAlmostEqual(by_kl[0], 26.0 / 12.0)
        self.assertEqual(lexico[0]["kv"], 10.0)


class Glance(unittest.TestCase):
    def test_a_front_without_runs_says_whether_its_rule_has_a_setting(self):
        claim = {"variants": {"Lexico a": {"proxies": {"p1": ["x"]}}, "Lexico b": {"proxies": {"p1": ["y"], "p2": ["z"]}}}}
        columns = {("p1", "fresh"): {"Lexico": "2.00× / 1.50×", "Lexico a": "3.00× / 2.00×"},
                   ("p2", "fresh"): {"Lexico": "1.10× / —"}}
        rows = glance(claim, columns)[-3:]
        self.assertEqual(rows[0], "| Lexico | 2.00× / 1.50× | 1.10× / — |")
        self.assertEqual(rows[1], "| Lexico a | 3.00× / 2.00× | no setting |")
        self.assertEqual(rows[2], "| Lexico b | not run | not run |")


if __name__ == "__main__":
    unittest.main()
