"""`splitserve profile`: run the engine on this machine and fit the latency model's
coefficients (DistServe's form) for the planner and simulator."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from placement.latency import Coeffs, LatencyModel, fit_decode, fit_prefill


def profile_engine(model_dir: str | Path, dtype: str = "float32", threads: int = 1,
                   repeats: int = 5) -> dict[str, object]:
    from engine.engine import LLMEngine
    from engine.scheduler import SchedulerConfig
    from engine.sequence import SamplingParams

    torch.set_num_threads(threads)
    eng = LLMEngine.from_model_dir(model_dir, dtype=dtype, num_blocks=2048, block_size=16,
                                   scheduler_config=SchedulerConfig(max_num_batched_tokens=4096,
                                                                    max_model_len=8192),
                                   enable_prefix_caching=False)
    gen = torch.Generator().manual_seed(0)
    counter = iter(range(10**9))

    def prompt(n: int) -> list[int]:
        return torch.randint(3, 1000, (n,), generator=gen).tolist()

    prefill: list[tuple[list[int], float]] = []
    for lens in ([16], [64], [128], [256], [512], [1024], [64, 64], [128, 256, 32], [512, 512]):
        for _ in range(repeats):
            for n in lens:
                eng.add_request(f"p{next(counter)}", prompt(n), SamplingParams(temperature=0, max_tokens=1))
            t0 = time.perf_counter()
            eng.step()
            prefill.append((lens, time.perf_counter() - t0))
    decode: list[tuple[int, int, float]] = []
    for batch in (1, 2, 4, 8, 16):
        for ctx in (32, 256, 768):
            seqs = [eng.add_request(f"d{next(counter)}", prompt(ctx),
                                    SamplingParams(temperature=0, max_tokens=repeats + 2, ignore_eos=True))
                    for _ in range(batch)]
            while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in seqs):
                eng.step()
            for _ in range(repeats):
                total = sum(s.num_tokens for s in seqs)
                t0 = time.perf_counter()
                eng.step()
                decode.append((batch, total, time.perf_counter() - t0))
            while eng.has_work:
                eng.step()
    # Medians per configuration: this machine is shared, single samples are noisy.
    pm: dict[tuple[int, ...], list[float]] = {}
    for lens, t in prefill[repeats:]:  # the first configuration's runs warm up
        pm.setdefault(tuple(lens), []).append(t)
    dm: dict[tuple[int, int], list[float]] = {}
    for b, c, t in decode:
        dm.setdefault((b, c // 64), []).append(t)
    p_med = [(list(k), statistics.median(v)) for k, v in pm.items()]
    d_med = [(k[0], k[1] * 64, statistics.median(v)) for k, v in dm.items()]
    model = LatencyModel(fit_prefill(p_med), fit_decode(d_med))
    err_p = [abs(model.prefill_s(lens) - t) / t for lens, t in p_med]
    err_d = [abs(model.decode_s(b, c) - t) / t for b, c, t in d_med]
    return {"prefill": list(model.prefill.as_tuple()), "decode": list(model.decode.as_tuple()),
            "threads": threads, "dtype": dtype,
            "median_rel_error_prefill": statistics.median(err_p), "max_rel_error_prefill": max(err_p),
            "median_rel_error_decode": statistics.median(err_d), "max_rel_error_decode": max(err_d),
            "samples": {"prefill": len(prefill), "decode": len(decode)}}


def load_profile(path: str | Path) -> LatencyModel:
    data = json.loads(Path(path).read_text())
    return LatencyModel(Coeffs(*data["prefill"]), Coeffs(*data["decode"]))
