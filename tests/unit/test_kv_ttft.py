"""benchmarks/kv_ttft.py's averaging: a run that measured no KV bytes has no ratio, and is
left out of the mean instead of counting as a codec that sent 0 bytes."""

from benchmarks.kv_ttft import mean_measured


def test_runs_without_a_byte_count_are_left_out_not_counted_as_zero():
    assert mean_measured([0.5, None]) == 0.5
    assert mean_measured([0.25, 0.75]) == 0.5
    assert mean_measured([None, None]) is None
    assert mean_measured([]) is None
