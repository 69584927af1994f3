import torch

from benchmarks.codec_bench import codec_set, size_table, summary, synthetic_kv
from kvtransfer.codec import calibrate, get_codec


def test_synthetic_kv_has_the_structure_the_bench_claims():
    kv = synthetic_kv(layers=2, tokens=64, heads=2, dim=16)
    assert kv.shape == (2, 2, 64, 2, 16)
    v = kv[:, 1]
    step = (v[:, 1:] - v[:, :-1]).pow(2).mean() / v.pow(2).mean()
    assert step < 0.6  # token-wise locality
    same_model = synthetic_kv(layers=2, tokens=64, heads=2, dim=16, token_seed=1)
    assert not torch.equal(kv, same_model)


def test_size_table_and_summary_on_small_synthetic_kv():
    kv = synthetic_kv(layers=2, tokens=40, heads=2, dim=16).to(torch.bfloat16)
    calib = [synthetic_kv(layers=2, tokens=40, heads=2, dim=16, token_seed=1).to(torch.bfloat16)]
    rows = size_table(kv, codec_set(calib, range(6)), chunk_tokens=16, repeats=1)
    assert rows["none"]["rel_l2"] == 0 and rows["lossless"]["rel_l2"] == 0
    assert rows["cg5"]["ratio_vs_int8"] > rows["cg0"]["ratio_vs_int8"] > 1
    assert rows["int8"]["ratio_vs_int8"] == 1
    out = summary({"trained/bfloat16": {"codecs": rows}}, ["bfloat16"])
    assert out["bfloat16"]["lossless_ratio_vs_raw"] > 1


def test_calibrate_dispatch():
    kv = synthetic_kv(layers=2, tokens=20, heads=1, dim=8)
    table = calibrate("lossless", [kv.to(torch.bfloat16)])
    assert get_codec("lossless", table=table).decode(get_codec("lossless", table=table).encode(kv)).shape == kv.shape
    tables = calibrate("cachegen", [kv], levels=(3,))
    assert 3 in tables.levels
    try:
        calibrate("int8", [kv])
    except ValueError as e:
        assert "nothing to calibrate" in str(e)
    else:
        raise AssertionError("int8 calibrate should fail")
