"""benchmarks/kv_quality.py runs end to end on a tiny model (the real-model figures are
the benchmark's, not a test's)."""

import json

from benchmarks.kv_quality import main, parse_codecs


def test_parse_codecs():
    assert parse_codecs("none,cachegen:0-2,kvtc:3") == ["none", "cachegen:0", "cachegen:1", "cachegen:2", "kvtc:3"]


def test_runs_on_a_tiny_model(tmp_path):
    from models.builtin import builtin_model_dir

    out = tmp_path / "q.json"
    assert main(["--model-dir", str(builtin_model_dir("tiny-llama")), "--windows", "2", "--ctx", "48", "--cont",
                 "12", "--codecs", "none,lossless,int8,cachegen:3", "--dtypes", "bfloat16", "--repeats", "1",
                 "--speed-tokens", "16", "--json", str(out), "--plot", str(tmp_path / "q.png")]) == 0
    res = json.loads(out.read_text())
    rows = res["rows"]["bfloat16"]
    assert rows["none"]["ppl_pct"] == 0 and rows["none"]["kl"] == 0 and rows["none"]["greedy_agree"] == 1
    assert rows["lossless"]["ppl_pct"] == 0
    assert rows["int8"]["ratio_vs_int8"] == 1 and rows["cachegen:3"]["ratio_vs_fp16"] > rows["int8"]["ratio_vs_fp16"]
    assert rows["cachegen:3"]["encode_MBps"] > 0
    assert len(res["windows"]) == 2 and (tmp_path / "q.png").stat().st_size > 0
    assert set(res["targets"]["bfloat16"]) >= {"within_1pct", "within_2pct"}


def test_split_runs_merge_into_the_whole_run(tmp_path):
    """--first-window splits a run over windows; --merge pools the parts into the figures
    of one run over all of them."""
    from models.builtin import builtin_model_dir

    common = ["--model-dir", str(builtin_model_dir("tiny-llama")), "--ctx", "48", "--cont", "12", "--codecs",
              "none,int8,cachegen:1", "--dtypes", "bfloat16", "--repeats", "0"]
    paths = {k: tmp_path / f"{k}.json" for k in ("whole", "a", "b", "merged")}
    assert main(common + ["--windows", "2", "--json", str(paths["whole"])]) == 0
    assert main(common + ["--windows", "1", "--json", str(paths["a"])]) == 0
    assert main(common + ["--windows", "1", "--first-window", "1", "--json", str(paths["b"])]) == 0
    assert main(common + ["--merge", f"{paths['a']},{paths['b']}", "--json", str(paths["merged"])]) == 0
    whole, merged = (json.loads(paths[k].read_text()) for k in ("whole", "merged"))
    assert merged["windows"] == whole["windows"]
    for lb, r in whole["rows"]["bfloat16"].items():
        m = merged["rows"]["bfloat16"][lb]
        for k in ("ratio_vs_fp16", "ppl_pct", "kl", "greedy_agree"):
            assert abs(m[k] - r[k]) < 1e-9, (lb, k)
    assert merged["rows"]["bfloat16"]["cachegen:1"]["stored_cost_pct"] > 0
