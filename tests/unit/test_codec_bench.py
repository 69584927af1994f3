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


def test_curve_covers_every_level_and_is_drawn(tmp_path):
    """The size/perplexity curve: every level of every cachegen family plus int8 and
    lossless, ratios rising with the level (shipped tables), the published points in the
    JSON, and a PNG on disk."""
    import json

    from benchmarks.codec_bench import FAMILIES, PUBLISHED, plot_curve

    kv = synthetic_kv(layers=2, tokens=60, heads=2, dim=16).to(torch.float16)
    calib = [synthetic_kv(layers=2, tokens=60, heads=2, dim=16, token_seed=1).to(torch.float16)]
    rows = size_table(kv, codec_set(calib, range(6)), chunk_tokens=0, repeats=1)
    # a stand-in quality run: perplexity change growing with the error, lossless exact
    quality = {k: {"ppl_vs_exact_pct": 100 * r["rel_l2"] ** 2, "greedy_agree": 1.0} for k, r in rows.items()}
    out = summary({"trained/float16": {"codecs": rows}, "quality/float16": quality}, ["float16"])
    curve = out["float16"]["curve"]
    for fam in FAMILIES:
        levels = sorted(p["level"] for p in curve if p["family"] == fam)
        assert levels == list(range(6)), (fam, levels)
    ratios = [p["ratio_vs_fp16"] for p in sorted((p for p in curve if p["family"] == "cg"), key=lambda p: p["level"])]
    assert ratios == sorted(ratios) and ratios[-1] > 2 * ratios[0]
    by = {p["codec"]: p for p in curve}
    assert by["lossless"]["ppl_vs_exact_pct"] == 0 and by["lossless"]["ratio_vs_fp16"] > 1
    assert 1.5 < by["int8"]["ratio_vs_fp16"] < 2
    assert set(out["published"]) == set(PUBLISHED)
    assert PUBLISHED["cachegen_sigcomm24"]["ratio_vs_int8"] == [3.5, 4.3]
    json.dumps(out)  # the summary (curve and published points) goes into the JSON as is
    png = plot_curve(out, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_main_writes_json_and_plot_next_to_it(tmp_path):
    """--json PATH writes the file and, without --plot, the curve PNG beside it. The real
    path: the KV is the tiny built-in Llama's own, from its prefill of a stdlib file (short,
    so the test stays fast)."""
    import json

    import benchmarks.codec_bench as cb
    from models.builtin import builtin_model_dir

    model_dir = builtin_model_dir("tiny-llama")
    kv = cb.real_kv(model_dir, "bfloat16", 48)
    assert kv.dtype == torch.bfloat16 and kv.shape[1] == 2 and kv.shape[2] == 48 and kv.abs().sum() > 0
    out = tmp_path / "codec.json"
    assert cb.main(["--json", str(out), "--dtypes", "bfloat16", "--quality-windows", "0", "--skip-synthetic",
                    "--repeats", "1", "--tokens", "48", "--model-dir", str(model_dir)]) == 0
    data = json.loads(out.read_text())
    assert data["summary"]["plot"] == str(tmp_path / "codec_curve.png")
    assert (tmp_path / "codec_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert {p["family"] for p in data["summary"]["bfloat16"]["curve"]} >= {"cg", "cgcal", "cgpca", "int8", "lossless"}
    rows = data["trained/bfloat16"]["codecs"]
    assert rows["none"]["rel_l2"] == 0 and rows["lossless"]["rel_l2"] == 0 and rows["int8"]["rel_l2"] > 0
