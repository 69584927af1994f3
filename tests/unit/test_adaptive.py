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


def test_quality_floor_excludes_options_whatever_the_budget():
    """An option whose expected perplexity cost is above kv_transfer.max_quality_loss is
    never chosen, even when only it would meet the budget (then the plan recomputes or
    misses the budget instead)."""
    from kvtransfer.adaptive import CodecOption
    from kvtransfer.policy import PolicySpec, TransferPolicy

    opts = [CodecOption("none", None, 1.0, 5e9, 5e9, 0, 0.0), CodecOption("int8", None, 0.5, 1e9, 1e9, 1, 0.001),
            CodecOption("cachegen", 1, 0.25, 1e9, 1e9, 3, 0.004),
            CodecOption("cachegen", 3, 0.12, 1e9, 1e9, 5, 0.17)]
    tight = PolicySpec("adaptive", 3, 512, allow_recompute=False, budget_s=1e-6)
    strict = TransferPolicy(PolicySpec(**{**tight.__dict__, "max_quality_loss": 0.01}), list(opts), 1e-4, 1e6)
    assert [o.label for o in strict.controller.options] == ["none", "int8", "cachegen:1"]
    plan = strict.planner("a", "b", 10_000)(2048)
    assert set(plan.choices) <= {"none", "int8", "cachegen:1"}
    loose = TransferPolicy(PolicySpec(**{**tight.__dict__, "max_quality_loss": 0.5}), list(opts), 1e-4, 1e6)
    assert "cachegen:3" in set(loose.planner("a", "b", 10_000)(2048).choices)
    # the built-in profile: the default floor (1%) keeps exactly the options measured within it
    default = TransferPolicy(PolicySpec("adaptive"))
    assert all(o.quality_loss <= 0.01 for o in default.controller.options)
    assert {"none", "lossless", "int8"} <= {o.label for o in default.controller.options}
    default.set_measured(list(opts))
    assert "cachegen:3" not in {o.label for o in default.controller.options}


def test_unmeasured_option_is_outside_every_floor():
    from kvtransfer.adaptive import expected_quality_loss

    assert expected_quality_loss("cachegen", 9) == float("inf")
    assert expected_quality_loss("kvtc", 2, {"kvtc:2": 0.004}) == 0.004
    assert expected_quality_loss("none", None) == 0.0


def test_pinned_lossy_codecs_default_to_their_strongest_level_within_the_floor():
    """cachegen pinned without a level is its strongest level within the floor (by the
    session 9 rule none is within 1% on SmolLM2: level 0, the finest); kvtc pinned takes the strongest level its calibration measured within the
    floor, and a pinned level above it is refused."""
    import pytest

    from kvtransfer.policy import PolicySpec, TransferPolicy

    assert PolicySpec("cachegen").labels() == ["cachegen:0"]  # none within 1% by the rule: the finest
    assert PolicySpec("cachegen", max_quality_loss=0.02).labels() == ["cachegen:0"]
    assert PolicySpec("cachegen", max_quality_loss=0.04).labels() == ["cachegen:1"]
    assert PolicySpec("cachegen", max_quality_loss=0.3).labels() == ["cachegen:3"]
    costs = {f"kvtc:{lv}": c for lv, c in enumerate([0.001, 0.002, 0.003, 0.004, 0.006, 0.008, 0.013, 0.03])}
    assert PolicySpec("kvtc", measured=costs).labels() == ["kvtc:5"]
    assert PolicySpec("kvtc", max_quality_loss=0.02, measured=costs).labels() == ["kvtc:6"]
    assert PolicySpec("kvtc", level=2).labels() == ["kvtc:2"]
    pinned = TransferPolicy(PolicySpec("kvtc", level=7))
    with pytest.raises(ValueError, match="max_quality_loss"):
        pinned.set_costs(costs)
    TransferPolicy(PolicySpec("kvtc", level=5)).set_costs(costs)  # within: fine
    # adaptive over kvtc: its levels with the calibration's costs, those above the floor out
    ad = TransferPolicy(PolicySpec("adaptive", adaptive_lossy="kvtc"))
    assert "kvtc:7" in ad.spec.labels()
    assert not {o.label for o in ad.controller.options} & {f"kvtc:{lv}" for lv in range(8)}  # unmeasured: inf
    ad.set_costs(costs)
    got = {o.label for o in ad.controller.options}
    assert {"kvtc:0", "kvtc:5"} <= got and not got & {"kvtc:6", "kvtc:7"}
