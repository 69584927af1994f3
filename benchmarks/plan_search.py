"""Time the layout search on a 64-GPU cluster (8 nodes x 8 A100-80G) and print the
DistServe comparison (OPT-13B/66B chatbot, section 6.2 of the paper) beside ours.

    PYTHONPATH=. python -m benchmarks.plan_search [--gpus 64] [--distserve]
"""

from __future__ import annotations

import argparse
import time

from placement.catalogue import ModelShape, gpu, opt
from placement.search import SLO, Layout, Workload, best_of_kind, search

# Mixtral-8x7B's shape (config.json of mistralai/Mixtral-8x7B-v0.1): the MoE case.
MIXTRAL_8X7B = ModelShape("mixtral-8x7b", num_layers=32, hidden=4096, intermediate=14336, num_heads=32,
                          num_kv_heads=8, head_dim=128, vocab=32000, num_experts=8, top_k=2)
# The workload and request cap `splitserve plan` uses for deploy/manifests/opt*-a100.yaml.
CHAT = Workload((64, 1024), (16, 512), num_requests=300, max_requests=2000)
# DistServe's chatbot SLOs (table 1): OPT-13B 0.25 s / 0.1 s, OPT-66B 2.5 s / 0.15 s.
SLOS = {"opt-13b": SLO(0.25, 0.1), "opt-66b": SLO(2.5, 0.15), "mixtral-8x7b": SLO(2.5, 0.15)}


def _pools(lay: Layout) -> str:
    def one(s: dict) -> str:
        if "attention_workers" in s:
            return f"{s['attention_workers']} attention + {s['expert_workers']} expert workers"
        return f"tp{s['tp']}"

    return ", ".join(f"{n}: {int(s['replicas'])} x {one(s)}" for n, s in lay.pools.items())  # type: ignore[call-overload]


def run(model: ModelShape, num_gpus: int, wl: Workload = CHAT) -> tuple[float, list[Layout], dict]:
    st: dict = {}
    t0 = time.monotonic()
    lays = search(model, gpu("a100-80g"), num_gpus, SLOS[model.name], wl, stats=st,
                  attention_expert=model.num_experts > 0)
    return time.monotonic() - t0, lays, st


def run_64() -> list[tuple[str, float, Layout]]:
    out = []
    for model in (opt("66b"), MIXTRAL_8X7B):
        seconds, lays, _ = run(model, 64)
        out.append((model.name, seconds, lays[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--models", default="opt-13b,opt-66b,mixtral-8x7b")
    args = ap.parse_args()
    models = {"opt-13b": opt("13b"), "opt-66b": opt("66b"), "mixtral-8x7b": MIXTRAL_8X7B}
    for name in args.models.split(","):
        seconds, lays, st = run(models[name], args.gpus)
        print(f"{name} on {args.gpus} x a100-80g: search {seconds:.1f} s, {st['simulations']} simulations, "
              f"{st['pairs']} prefill/decode pairs ({st['pairs_pruned']} pruned by bound, "
              f"{st['units_verified']} units verified)")
        for kind, lay in best_of_kind(lays).items():
            print(f"  {kind:18s} {lay.goodput_per_gpu:6.3f} req/s/GPU on {lay.gpus:3d} GPUs  {_pools(lay)}")


if __name__ == "__main__":
    main()
