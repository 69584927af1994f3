"""The bench CLI without Ray: bad input (exit 2, naming the flag or line), server checks
before any load (exit 1), and whole runs against a stub OpenAI server with known
latencies (benchmarks/fake_server.py): files, failures, timeouts, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.bench import main
from benchmarks.client import ServerCheckError, ServerInfo, make_client, preflight, send
from benchmarks.fake_server import FakeServer
from benchmarks.metrics import compute_summary, read_records
from benchmarks.workload import RequestSpec

ROOT = Path(__file__).resolve().parents[2]
TTFT_S, TPOT_S = 0.05, 0.01


@pytest.fixture(scope="module")
def fake_url():
    server = FakeServer(TTFT_S, TPOT_S)
    url = server.start()
    yield url
    server.stop()


def _args(url, out, *extra):
    return ["--url", url, "--duration", "2", "--slo-ttft-ms", "500", "--slo-tpot-ms", "100",
            "--out", str(out), "--no-progress", "--no-plots", "--warmup", "0", *extra]


@pytest.mark.parametrize("flags, message", [
    (["--rates", "1,x"], "argument --rates: 'x' is not a number"),
    (["--rates", "0"], "argument --rates: '0': rates must be > 0"),
    (["--rates", "1,1"], "repeats a rate"),
    (["--rates", "1", "--duration", "-5"], "argument --duration: --duration must be > 0, found -5"),
    (["--rates", "1", "--nodes", "0"], "argument --nodes: 0"),
    (["--rates", "1", "--burstiness", "0"], "--burstiness must be > 0"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, message):
    argv = ["--url", "http://127.0.0.1:1", "--duration", "1", "--out", str(tmp_path), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--rates", "1", "--nodes", "1,2"], "--nodes: with --url give one node count"),
    (["--duration", "1"], "--rates is required"),
    (["--rates", "1", "--simulate"], "--simulate: simulates our manifests; use --manifest or --compare"),
    (["--rates", "1", "--gpu-type", "h100"], "--gpu-type only applies with --simulate"),
    (["--rates", "1", "--prompt-tokens", "9:3"], "--prompt-tokens"),
    (["--rates", "1", "--trace", "/nonexistent.jsonl"], "--trace: /nonexistent.jsonl does not exist"),
])
def test_bad_combinations_exit_2_before_contacting_the_server(tmp_path, capsys, flags, message):
    argv = ["--url", "http://127.0.0.1:1", "--duration", "1", "--out", str(tmp_path / "o"),
            "--slo-ttft-ms", "100", "--slo-tpot-ms", "10", *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_slo_required_with_url(tmp_path, capsys):
    assert main(["--url", "http://127.0.0.1:1", "--rates", "1", "--duration", "1", "--out", str(tmp_path)]) == 2
    assert "--slo-ttft-ms and --slo-tpot-ms are required with --url" in capsys.readouterr().err


def test_malformed_trace_line_exit_2(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "prompt_tokens": 4, "output_tokens": 2}\n{"arrival_s": 1}\n')
    assert main(_args("http://127.0.0.1:1", tmp_path / "o", "--trace", str(trace))) == 2
    assert f"{trace}:2: 'output_tokens' must be an integer >= 1" in capsys.readouterr().err


def test_unreachable_url_fails_before_load(tmp_path, capsys):
    assert main(_args("http://127.0.0.1:1", tmp_path / "o", "--rates", "1")) == 1
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:1" in err and "is the server running" in err
    assert not (tmp_path / "o" / "requests.jsonl").exists()


async def _preflight_against(handler):
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with client:
        return await preflight(client, "http://stub", None, "completions")


@pytest.mark.parametrize("status, body, message", [
    (404, "<html>Not Found</html>", "expected an OpenAI model list"),
    (200, '{"models": []}', "expected an OpenAI model list"),
    (200, '{"data": []}', "with no model"),
])
def test_non_openai_server_is_refused(status, body, message):
    import asyncio

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text=body)

    with pytest.raises(ServerCheckError, match=message):
        asyncio.run(_preflight_against(handler))


def test_server_whose_completions_fail_is_refused():
    import asyncio

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(404, json={"detail": "Not Found"})

    with pytest.raises(ServerCheckError, match="streamed completions request failed: HTTP 404: Not Found"):
        asyncio.run(_preflight_against(handler))


@pytest.mark.parametrize("sse, ok, error", [
    ('data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[{"text":"b"}]}\n\ndata: [DONE]\n\n', True, None),
    ('data: {"choices":[{"text":"a"}]}\n\n', False, "stream ended without data: [DONE]"),
    ('data: {"choices":[{"text":"a"}]}\n\ndata: {"error":{"message":"worker died"}}\n\n', False,
     "stream error: worker died"),
    ("data: [DONE]\n\n", False, "no token received"),
    ("data: {not json\n\n", False, "malformed stream"),
])
def test_send_classifies_streams(sse, ok, error):
    import asyncio

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send(client, ServerInfo("http://stub", "m", False), RequestSpec(0, [5, 6], 2, 4),
                              "completions", timeout_s=5)

    res = asyncio.run(go())
    assert res.ok is ok
    assert (res.error is None) if error is None else (error in res.error)
    if ok:
        assert res.output_tokens == 2 and res.ttft_s is not None and len(res.gaps_s) == 1


def test_send_counts_token_ids_and_usage():
    import asyncio

    sse = ('data: {"choices":[{"text":"ab","token_ids":[1,2]}]}\n\n'
           'data: {"choices":[{"text":"c","token_ids":[3]}]}\n\n'
           'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\ndata: [DONE]\n\n')

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["return_token_ids"] and body["ignore_eos"] and body["stream"]
        assert body["max_tokens"] == 3 and body["stream_options"] == {"include_usage": True}
        return httpx.Response(200, text=sse)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send(client, ServerInfo("http://stub", "m", True), RequestSpec(0, "hi", 0, 3),
                              "completions", timeout_s=5)

    res = asyncio.run(go())
    assert res.ok and res.output_tokens == 3 and res.prompt_tokens == 7


def test_bench_against_stub_server(fake_url, tmp_path):
    """Whole run: files agree, timings are at least the stub's own delays, failures and
    timeouts are recorded without stopping the run."""
    trace = tmp_path / "t.jsonl"
    lines = [{"arrival_s": 0.1 * i, "prompt": [3 + i, 4, 5], "output_tokens": 5} for i in range(12)]
    lines[3]["prompt"] = [1, 9, 9]   # the stub answers 500
    lines[5]["prompt"] = [2, 9, 9]   # the stub stalls: timeout
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    argv = _args(fake_url, out, "--trace", str(trace), "--rates", "10,20", "--timeout", "1.5")
    assert main(argv) == 0
    records = read_records(out / "requests.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert {r.rate for r in records} == {10.0, 20.0}
    assert len(records) == 24
    failed = [r for r in records if not r.ok]
    assert sorted(r.error.split(":")[0] for r in failed) == ["HTTP 500"] * 2 + ["timeout after 1.5s"] * 2
    for r in records:
        if r.ok:
            assert r.output_tokens == 5 and r.ttft_s >= TTFT_S and r.tpot_s >= TPOT_S * 0.9
            assert r.e2e_s >= TTFT_S + 4 * TPOT_S
    recomputed = compute_summary(records, summary["config"])
    assert {k: summary[k] for k in recomputed} == json.loads(json.dumps(recomputed))
    for run in summary["runs"]:
        assert run["failed"] == 2 and run["attainment"]["both"] == pytest.approx(10 / 12)
    assert summary["interrupted"] is False and len(summary["server_phases"]) == 2


def test_plots_and_json_output(fake_url, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _args(fake_url, out, "--rates", "2,4", "--output-tokens", "4", "--json")
    argv.remove("--no-plots")
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "summary.json").read_text())
    for name in ("attainment_vs_rate.png", "goodput_vs_nodes.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.fixture
def own_fake_url():
    """The stub server in a process of its own: after a full suite the test process holds
    many threads (Ray's, servers'), and a stub sharing its GIL answered slowly enough that
    the interrupted bench did not finish within the test's wait (twice in session 9)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.fake_server", "--port", str(port),
                             "--ttft-ms", str(TTFT_S * 1e3), "--tpot-ms", str(TPOT_S * 1e3)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/metrics", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_ctrl_c_writes_what_was_measured(own_fake_url, tmp_path):
    fake_url = own_fake_url
    out = tmp_path / "out"
    trace = tmp_path / "t.jsonl"
    # A run far longer than the test waits (2000 requests over 400 s), so the SIGINT always
    # lands while it is under way, however slowly this machine starts the process.
    n = 2000
    trace.write_text("\n".join(json.dumps({"arrival_s": 0.2 * i, "prompt_tokens": 4, "output_tokens": 3})
                               for i in range(n)) + "\n")
    cmd = [sys.executable, "-m", "benchmarks.bench", *_args(fake_url, out, "--trace", str(trace))]
    cmd[cmd.index("--duration") + 1] = "400"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # Interrupt once the run is under way: the stub has answered a few more requests.
        def served() -> float:
            return float(httpx.get(f"{fake_url}/metrics").text.split("fake_requests_total ")[1])

        start, deadline = served(), time.monotonic() + 120
        while served() < start + 8:
            assert proc.poll() is None, f"bench exited {proc.returncode} before the SIGINT: {proc.communicate()}"
            assert time.monotonic() < deadline, "bench served fewer than 8 requests in 120 s"
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before the SIGINT"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    summary = json.loads((out / "summary.json").read_text())
    records = read_records(out / "requests.jsonl")
    assert summary["interrupted"] is True and 3 <= len(records) < n
    assert summary["runs"][0]["requests"] == len(records)
