from kvtransfer.adaptive import RECOMPUTE, AdaptiveController, CodecOption, LinkEstimate

OPTS = [
    CodecOption("none", None, 1.0, 1e12, 1e12, 0),
    CodecOption("lossless", None, 0.8, 1e9, 1e9, 0),
    CodecOption("cachegen", 1, 0.1, 2e8, 2e8, 1),
    CodecOption("cachegen", 3, 0.05, 2e8, 2e8, 2),
]
MB = 1 << 20


def ctrl(bps: float, recompute: float = 1e-3) -> AdaptiveController:
    c = AdaptiveController(list(OPTS), recompute_s_per_token=recompute)
    c.links[("a", "b")] = LinkEstimate(bps, samples=1)
    return c


def test_fast_link_sends_raw():
    p = ctrl(1e11).plan("a", "b", [8 * MB] * 4, [256] * 4, budget_s=1.0)
    assert p.choices == ["none"] * 4 and p.meets_budget


def test_slow_link_compresses_only_as_much_as_needed():
    c = ctrl(1.25e8)  # 1 Gbit/s
    loose = c.plan("a", "b", [8 * MB] * 4, [256] * 4, budget_s=10.0)
    tight = c.plan("a", "b", [8 * MB] * 4, [256] * 4, budget_s=0.2)
    assert loose.choices == ["none"] * 4
    assert any(x.startswith("cachegen") for x in tight.choices) and tight.meets_budget
    assert tight.predicted_s <= 0.2
    assert "none" in tight.choices or "lossless" in tight.choices  # only as lossy as needed


def test_recompute_when_no_level_meets_budget():
    p = ctrl(1e6, recompute=1e-5).plan("a", "b", [8 * MB] * 2, [256] * 2, budget_s=0.01)
    assert RECOMPUTE in p.choices


def test_link_estimate_tracks_measurements():
    e = LinkEstimate(1e9)
    e.observe(100 * MB, 1.0)
    assert abs(e.bps - 100 * MB) < 1
    e.observe(100 * MB, 2.0)
    assert 50 * MB < e.bps < 100 * MB
