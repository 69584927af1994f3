"""TTFT admission's model: fixed part and per-token part fitted apart, so short prompts do
not make a queue look slower than it is."""

import pytest

from cluster.admission import TTFTModel


def test_fits_fixed_and_per_token_parts():
    m = TTFTModel()
    for x in (40, 60, 300, 120, 500, 80, 250):
        m.observe(x, 0.2 + 0.001 * x)  # 200 ms fixed, 1 ms per queued token
    a, b = m.coefficients()
    assert a == pytest.approx(0.2, rel=1e-6) and b == pytest.approx(0.001, rel=1e-6)
    assert m.predict(1000) == pytest.approx(1.2, rel=1e-6)
    # The ratio a single rate would use predicts 3.3x the truth at 1000 queued tokens.
    ratio = sum(0.2 + 0.001 * x for x in (40, 60)) / 100
    assert ratio * 1000 > 3 * m.predict(1000)


def test_no_spread_predicts_the_mean_where_seen_and_scales_beyond():
    m = TTFTModel()
    for _ in range(5):
        m.observe(50, 0.5)
    assert m.predict(50) == pytest.approx(0.5) and m.predict(100) == pytest.approx(1.0)


def test_recent_load_counts_most_and_noise_never_goes_negative():
    m = TTFTModel(decay=0.5)
    for x in (100, 200, 300):
        m.observe(x, 3.0)  # a slow spell
    for x in (100, 200, 300, 100, 200, 300, 100, 200, 300):
        m.observe(x, 0.1 + 0.0001 * x)
    assert m.predict(200) < 0.5
    n = TTFTModel()
    n.observe(100, 0.9)
    n.observe(300, 0.3)  # more tokens, faster: noise
    a, b = n.coefficients()
    assert b == 0 and 0.3 < n.predict(200) == n.predict(1000) < 0.9  # the (decayed) mean TTFT


def test_queue_refusal_only_over_the_target_and_names_it():
    from cluster.admission import queue_refusal

    assert queue_refusal(None, 300, 0.0, 0.001, 50) is None  # nothing queued / unmeasured
    assert queue_refusal(0.3, 300, 0.0, 0.001, 50) is None  # at the target: admitted
    msg, retry = queue_refusal(2.6, 300, 0.1, 0.001, 50)
    assert retry == 3 and "2600 ms exceeds the 300 ms target" in msg and "prompt of 50 tokens" in msg
    assert "refused before parsing the request" in msg
    assert queue_refusal(500.0, 300, 0.1, 0.001, 50)[1] == 60  # Retry-After capped


def test_recent_prompts_assume_the_shortest():
    from cluster.admission import RecentPrompts

    rp = RecentPrompts(keep=3)
    assert rp.short() == 1  # nothing seen: assume the least
    for n in (100, 20, 60):
        rp.observe(n)
    assert rp.short() == 20
    rp.observe(80)  # 100 and 20 fall out of the window of 3 one by one
    rp.observe(90)
    assert rp.short() == 60


def test_tickets_count_requests_not_yet_admitted_and_release_once():
    from cluster.admission import Unadmitted

    u = Unadmitted()
    a, b = u.ticket(), u.ticket()
    assert u.count == 2
    a.release()
    a.release()  # idempotent: the exact check and the request's end may both release
    assert u.count == 1
    b.release()
    assert u.count == 0


def test_headroom_is_the_attainment_quantile_of_recent_residuals():
    from cluster.admission import Headroom

    h = Headroom(0.9, keep=10, min_samples=5)
    for r in (0.05, 0.01, 0.02, 0.03):
        h.observe(r)
    assert h.margin() == 0.0  # too few residuals yet
    h.observe(0.04)
    assert h.margin() == pytest.approx(0.05)  # 90th percentile of 0.01..0.05
    for _ in range(10):  # the model over-predicts now: residuals negative, margin never below 0
        h.observe(-0.02)
    assert h.margin() == 0.0
    for r in (0.1,) * 2 + (0.0,) * 8:  # a burst's ingress delay is learned within the window
        h.observe(r)
    assert h.margin() == pytest.approx(0.1)


def test_guard_releases_a_ticket_when_it_refuses_after_the_early_check():
    """refuse() let the request through with a ticket; the body-size check then refuses it
    (413 by Content-Length): the ticket must come back, or the early check would count a
    request that is gone as queued ahead for ever."""
    from cluster.admission import Unadmitted
    from cluster.http_guard import HOLD_KEY, RequestGuard

    u = Unadmitted()

    def refuse(scope):
        scope[HOLD_KEY] = u.ticket()
        return None

    guard = RequestGuard(None, max_body_bytes=10, refuse=refuse)
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"100")]}
    refused = guard.check(scope)
    assert refused is not None and refused[0] == 413
    assert u.count == 0 and HOLD_KEY not in scope
    ok = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"5")]}
    assert guard.check(ok) is None and u.count == 1  # let through: held until its exact check or its end
