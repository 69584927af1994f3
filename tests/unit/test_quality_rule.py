"""The one quality-cost rule of every lossy KV codec level (kvtransfer.quality): an upper
bound (mean or KL, whichever is larger, plus a one-sided interval that shrinks with the
calibration tokens), monotone in the level, inf where not measured; the kvtc calibration
stores the per-window stats and applies the rule to kvtc and cachegen levels alike."""

import math

import numpy as np
import pytest

from kvtransfer import quality


def _stats(d, kl, windows=1):
    d = np.asarray(d, np.float64)
    return np.stack([quality.window_stats(part, np.full(len(part), kl)) for part in np.array_split(d, windows)])


def test_cost_is_mean_plus_interval_and_never_below_kl():
    rng = np.random.default_rng(0)
    d = 0.002 + 0.1 * rng.standard_normal(500)
    c = quality.level_cost(_stats(d, kl=-1.0))  # KL below the mean: the mean is the centre
    m, s, n = d.mean(), d.std(ddof=1), len(d)
    assert c == pytest.approx(math.expm1(m + quality.Z * s * math.sqrt(1 / n + 1 / quality.N_REF)))
    assert c > math.expm1(m)  # an upper bound, not the estimate
    # KL above the mean: the KL is the centre
    c_kl = quality.level_cost(_stats(d, kl=0.05))
    assert c_kl == pytest.approx(math.expm1(0.05 + quality.Z * s * math.sqrt(1 / n + 1 / quality.N_REF)))
    # the same per-token spread over more calibration tokens: a tighter bound
    d4 = np.tile(d, 4)
    assert quality.level_cost(_stats(d4, kl=-1.0, windows=4)) < c
    # windows are pooled: splitting the same tokens differently changes nothing
    assert quality.level_cost(_stats(d, -1.0, windows=5)) == pytest.approx(c)
    assert quality.level_cost(np.zeros((1, 4))) == float("inf")  # no tokens


def test_costs_are_monotone_per_codec_and_unmeasured_levels_are_inf():
    rng = np.random.default_rng(1)
    labels = ["int8", "kvtc:0", "kvtc:1", "kvtc:2", "cachegen:0", "cachegen:2"]
    spreads = [0.005, 0.01, 0.2, 0.05, 0.02, 0.02]  # kvtc:1 noisier than kvtc:2
    stats = np.stack([_stats(s * rng.standard_normal(400), 0.0, 2) for s in spreads])
    c = quality.costs_by_label(labels, stats)
    assert c["kvtc:0"] < c["kvtc:1"] and c["kvtc:2"] == c["kvtc:1"]  # the coarser level takes the finer's cost
    assert math.isfinite(c["cachegen:0"]) and c["cachegen:2"] == float("inf")  # cachegen:1 not measured
    assert set(c) == set(labels) and 0 < c["int8"] < c["kvtc:1"]  # int8: one level, its own cost


def test_kvtc_calibration_stores_stats_and_costs_cover_both_codecs(tmp_path):
    from benchmarks.codec_bench import synthetic_kv
    from kvtransfer.codecs.kvtc_calib import KVTCCalibration, calibrate_kv

    cal = calibrate_kv(synthetic_kv(layers=2, tokens=64, heads=2, dim=16, token_seed=1))
    rng = np.random.default_rng(2)
    labels = [f"kvtc:{lv}" for lv in range(8)] + ["cachegen:0", "cachegen:1"]
    cal.q_labels = labels
    cal.q_stats = np.stack([_stats(0.01 * (i + 1) * rng.standard_normal(300), 0.001 * i, 3)
                            for i in range(len(labels))])
    got = cal.costs()
    assert set(got) == set(labels)
    assert got == quality.costs_by_label(labels, cal.q_stats)
    cal.save(tmp_path / "c.npz")
    back = KVTCCalibration.load(tmp_path / "c.npz")
    assert back.costs() == got and back.fingerprint == cal.fingerprint  # stats are not part of the transform


def test_a_calibration_saved_with_means_only_gets_the_same_rule():
    """Older files carry only the mean perplexity change and KL per level: the rule runs on
    them with the per-token spread sqrt(2 KL), so a level whose mean is well within the
    floor can still be out of it."""
    from benchmarks.codec_bench import synthetic_kv
    from kvtransfer.codecs.kvtc_calib import calibrate_kv

    cal = calibrate_kv(synthetic_kv(layers=2, tokens=64, heads=2, dim=16, token_seed=1))
    cal.ppl_cost_pct = np.array([0.0, 0.1, 0.3, -0.2, 0.3, 0.5, 1.0, np.nan])
    cal.kl = np.array([0.0002, 0.0005, 0.0007, 0.0017, 0.0027, 0.0047, 0.0081, 0.019])
    c = cal.costs()
    assert list(c) == [f"kvtc:{lv}" for lv in range(8)]
    assert c["kvtc:0"] < 0.01 and c["kvtc:5"] > 0.01  # mean 0.5%, KL 0.0047: its upper bound is above 1%
    assert c["kvtc:7"] == float("inf")
    assert all(a <= b for a, b in zip(list(c.values()), list(c.values())[1:]))
