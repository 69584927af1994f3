"""The simulator check's fitting code (benchmarks.sim_validate, issue 5): the per-window
speed factors from the speed probes, the scaled latency model and overheads, and the
comparison recovering a window that ran slower than the probes."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.sim_validate import SPEED_REPS, SPEED_SHAPES, compare, spec_for, window_speed, within
from placement.latency import Coeffs, LatencyModel, Overheads
from placement.simulator import SimRequest, Simulation

LAT = LatencyModel(Coeffs(1.8e-3, 1.1e-5, 3.6e-8), Coeffs(2.2e-3, 4.8e-7, 2.9e-5), attention="dense")
OVER = Overheads(request_s=8e-3, prompt_token_s=1e-6, step_s=6e-4, stream_token_s=6e-4)


def _probe(ttft: float, decode: float, output: int, ok: bool = True) -> dict:
    return {"prompt": 1024, "output": output, "ok": ok, "ttft_s": ttft if ok else None, "e2e_s": ttft + decode}


def test_window_speed_is_the_ratio_of_medians_per_phase():
    ref = [_probe(0.050, 0.010, 4), _probe(0.052, 0.100, 24), _probe(0.048, 0.011, 4), _probe(0.050, 0.104, 24)]
    win = [_probe(0.060, 0.015, 4), _probe(0.062, 0.150, 24), _probe(0.058, 0.016, 4), _probe(0.060, 0.156, 24)]
    kp, kd = window_speed(ref, win)
    assert kp == pytest.approx(0.060 / 0.050)
    # Decode from the longest output only: the short ones are mostly the decode start.
    assert kd == pytest.approx(0.153 / 0.102)
    # A failed probe (a 1000 s outlier with no TTFT) is left out, not averaged in.
    assert window_speed(ref, win + [_probe(1000.0, 1000.0, 24, ok=False)]) == (kp, kd)


def test_window_speed_needs_two_good_probes_of_each_kind():
    ref = [_probe(0.05, 0.1, 24), _probe(0.05, 0.1, 24)]
    assert window_speed(ref, [_probe(0.06, 0.12, 24)]) is None
    assert window_speed(ref, [_probe(0.06, 0.12, 24), _probe(0.06, 0.12, 24, ok=False)]) is None
    assert window_speed([], ref) is None
    assert window_speed(ref, [_probe(0.06, 0.12, 24), _probe(0.06, 0.12, 24)]) == pytest.approx((1.2, 1.2))


def test_scaled_latency_and_overheads_scale_each_phase_apart():
    s = LAT.scaled(2.0, 3.0)
    assert s.prefill.as_tuple() == pytest.approx(tuple(2 * c for c in LAT.prefill.as_tuple()))
    assert s.decode.as_tuple() == pytest.approx(tuple(3 * c for c in LAT.decode.as_tuple()))
    assert s.decode_s(8, 4000) == pytest.approx(3 * LAT.decode_s(8, 4000))
    # A mixed step: its prefill part by 2, its decode part by 3.
    pre = LAT.mixed_s([256], [0], 0, 0)
    assert s.mixed_s([256], [0], 8, 4000) == pytest.approx(2 * pre + 3 * (LAT.mixed_s([256], [0], 8, 4000) - pre))
    assert LAT.scaled(1.5).decode.as_tuple() == pytest.approx(tuple(1.5 * c for c in LAT.decode.as_tuple()))
    o = Overheads(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0).scaled(2.0, 10.0)
    assert (o.request_s, o.prompt_token_s, o.prefill_token_s, o.prefill_done_s) == (2.0, 4.0, 12.0, 14.0)
    assert (o.decode_start_s, o.step_s, o.stream_token_s) == (30.0, 40.0, 50.0)


def _simulate(lat: LatencyModel, over: Overheads, reqs: list[SimRequest]) -> tuple[list[SimRequest], float]:
    spec = spec_for("colocated", lat, over)
    Simulation(spec).run(reqs)
    return reqs, sum(i.busy_s for i in spec.instances)


def _speed_probes(lat: LatencyModel, over: Overheads) -> list[dict]:
    out = []
    for _ in range(SPEED_REPS):
        for p, o in SPEED_SHAPES:
            (r,), _ = _simulate(lat, over, [SimRequest(0.0, p, o)])
            out.append({"prompt": p, "output": o, "ok": True, "ttft_s": r.ttft_s,
                        "e2e_s": r.ttft_s + r.tpot_s * (o - 1)})
    return out


def test_compare_recovers_a_window_that_ran_slower_than_the_probes():
    """'Measured' = the simulator on a machine 1.3x slower in prefill and 1.2x in decode
    (steps and overheads); the overhead probes ran at full speed. The prediction from the
    overhead probes alone is off by more than the criterion; scaled by the window's speed
    probes it matches."""
    kp, kd = 1.3, 1.2
    slow_lat, slow_over = LAT.scaled(kp, kd), OVER.scaled(kp, kd)
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / 6.0, size=150))
    prompts = rng.integers(768, 1281, size=150)
    outputs = rng.integers(8, 25, size=150)
    got, busy = _simulate(slow_lat, slow_over, [SimRequest(float(a), int(p), int(o))
                                                for a, p, o in zip(arrivals, prompts, outputs)])
    records = [{"rate": 6.0, "round": 0, "ok": True, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s} for r in got]
    meas = {"probes": {"speed": _speed_probes(LAT, OVER)}, "records": records,
            "runs": [{"rate": 6.0, "round": 0, "busy_s": {"colocated": busy}, "loadavg_before": [0.0, 0.0, 0.0],
                      "speed_probes": _speed_probes(slow_lat, slow_over)}]}
    (row,) = compare("colocated", LAT, OVER, meas)
    (fp, fd), = row["window_factors"]
    assert fp == pytest.approx(kp, rel=0.02)   # TTFT of a 1024-token prompt: all prefill-side terms
    assert fd == pytest.approx(kd, rel=0.05)   # decode of 23 tokens: steps and streaming
    for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"):
        assert abs(row[f"{k}_window_error"]) < 0.05, (k, row[f"{k}_window_error"])
    assert within([row], "window") == 4
    assert row["ttft_p50_predicted_error"] < -0.15
    assert within([row]) < 4
    # Old measurements (no speed probes): the window column is the prediction.
    del meas["runs"][0]["speed_probes"]
    (old,) = compare("colocated", LAT, OVER, meas)
    assert old["window_factors"] == [None]
    assert old["ttft_p50_window_ms"] == pytest.approx(old["ttft_p50_predicted_ms"])


def test_machine_noise_summary():
    from benchmarks.machine_noise import summarize

    s = summarize([1.0, 1.0, 2.0, 1.0, 1.1])
    assert s["max_over_min"] == pytest.approx(2.0)
    assert s["median"] == pytest.approx(1.0)
    assert s["share_off_by_tol"] == pytest.approx(1 / 5)   # only the 2.0 window is >15 % off
    assert s["consecutive_change_p90"] == pytest.approx(1.0)  # 1.0 -> 2.0
    steady = summarize([1.0, 1.05, 0.97, 1.02])
    assert steady["share_off_by_tol"] == 0 and steady["max_over_min"] < 1.1
    with pytest.raises(ValueError, match="at least 2 windows"):
        summarize([1.0])


def test_admit_from_recovers_the_decode_workers_work_per_arrival():
    """The arrival probe made by the simulator with a known per-arrival cost on the decode
    worker: admit_from recovers it."""
    from benchmarks.sim_validate import ARRIVAL_COUNT, ARRIVAL_LONG, ARRIVAL_SHORT, admit_from

    over = Overheads(request_s=8e-3, decode_start_s=5e-3, step_s=4e-4, stream_token_s=4e-4)
    cont = {"decode": 1.3, "prefill": 1.5}
    offsets = [0.03 + 0.04 * j for j in range(ARRIVAL_COUNT)]

    def decode_of_long(o: Overheads, arrivals: bool) -> float:
        reqs = [SimRequest(0.0, *ARRIVAL_LONG)] + ([SimRequest(t, *ARRIVAL_SHORT) for t in offsets]
                                                   if arrivals else [])
        spec = spec_for("1p1d", LAT, o)
        spec.shared_slowdown = cont
        Simulation(spec).run(reqs)
        return reqs[0].tpot_s * (ARRIVAL_LONG[1] - 1)

    truth = Overheads(**{**over.__dict__, "decode_admit_s": 2e-3})
    # The term lengthens the running sequence's decode by at least the cost of every
    # arrival (more where the longer steps overlap the busy prefill worker more).
    extra = (decode_of_long(truth, True) - decode_of_long(truth, False)) - \
        (decode_of_long(over, True) - decode_of_long(over, False))
    assert ARRIVAL_COUNT * 2e-3 <= extra <= 1.3 * ARRIVAL_COUNT * 2e-3
    probes = {"arrivals": [{"alone_decode_s": decode_of_long(truth, False),
                            "beside_decode_s": decode_of_long(truth, True), "offsets_s": offsets}] * 3}
    got = admit_from(probes, "1p1d", LAT, over, cont)
    # Within 10 %: the simulated extra moves in steps (a step starts or not before an arrival).
    assert got.decode_admit_s == pytest.approx(2e-3, rel=0.1)
    assert got.decode_start_s == over.decode_start_s
    # Colocated layouts, or measurements without the probe: unchanged.
    assert admit_from(probes, "colocated", LAT, over, None) is over
    assert admit_from({}, "1p1d", LAT, over, cont) is over
