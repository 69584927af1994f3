"""`splitserve` command line: serve, validate, make-model, plan, profile, place-experts, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cluster.errors import ManifestError


def _load(path: str, servable: bool = False) -> object:
    """The manifest at path; servable: also the checks that only serving needs (a
    tokenizer beside the weights), which `validate` and `serve` make and `plan` does not."""
    from cluster.manifest import load_manifest

    return load_manifest(path, require_tokenizer=servable)


def _load_or_say(path: str, servable: bool = False, out: object = None, prefix: str = "") -> object | None:
    """_load, or None after printing the manifest's problems (one `field.path: reason`
    line each) to out (stderr unless given)."""
    try:
        return _load(path, servable=servable)
    except ManifestError as e:
        for line in e.lines():
            print(f"{prefix}{line}", file=out or sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    if _load_or_say(args.manifest, servable=args.servable, out=sys.stdout) is None:
        return 2
    print(f"{args.manifest}: valid")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    manifest = _load_or_say(args.manifest, servable=True)
    if manifest is None:
        return 2
    from cluster.serve import serve_forever

    try:
        return serve_forever(manifest, args.host, args.port, args.address)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        return 0


def cmd_apply(args: argparse.Namespace) -> int:
    """Roll out a changed manifest on the running deployment of the same name."""
    manifest = _load_or_say(args.manifest, servable=True)
    if manifest is None:
        return 2
    from cluster.ops import OpsError, apply_manifest, inline_expert_placement

    try:
        inline_expert_placement(manifest)  # type: ignore[arg-type]
        res = apply_manifest(manifest, args.address, args.namespace, args.drain_timeout)  # type: ignore[arg-type]
    except OpsError as e:
        print(str(e), file=sys.stderr)
        return 2
    if not res["ok"]:
        for path, why in res["problems"]:
            print(f"{args.manifest}: {path}: {why}", file=sys.stderr)
        return 2
    print(f"applied {args.manifest} (manifest version {res['manifest_version']}): changed "
          f"{', '.join(res['changed']) or 'nothing'}; rolled {res['rolled'] or 'no pool'}; resized "
          f"{res['resized'] or 'no pool'}; replicas {res['replicas']}"
          + (f"; experts re-placed live ({res['experts']['loaded']} copies loaded, {res['experts']['dropped']} "
             "dropped)" if res.get("experts") else ""))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """ray up, ship the project and manifest, serve on the head, wait for /health."""
    manifest = _load_or_say(args.manifest, servable=True, prefix=f"{args.manifest}: ")
    if manifest is None:
        return 2
    from cluster.ops import OpsError, deploy_cluster

    try:
        url = deploy_cluster(args.cluster, args.manifest, manifest, up=not args.no_up,  # type: ignore[arg-type]
                             address=args.address, host=args.host, port=args.port, timeout_s=args.timeout)
    except OpsError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(f"ready: {manifest.name} serving at {url}")  # type: ignore[attr-defined]
    print(url)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from cluster.ops import OpsError, down_cluster

    try:
        stopped = down_cluster(args.cluster, name=args.name, address=args.address, teardown=args.teardown)
    except OpsError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(f"stopped: {', '.join(stopped) or 'no deployment was running'}"
          + ("; cluster torn down (ray down)" if args.teardown else ""))
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from engine.errors import ModelLoadError

    if (args.arch is None) == (args.from_gguf is None):
        print("make-model: give exactly one of --arch (a tiny random model) or --from-gguf FILE", file=sys.stderr)
        return 2
    if args.from_gguf is not None:
        from models.gguf_import import convert_gguf

        try:
            out = convert_gguf(args.from_gguf, args.out)
        except ModelLoadError as e:
            print(str(e), file=sys.stderr)
            return 2
        print(f"converted {args.from_gguf} to {out}")
        return 0
    from models.make import make_model

    out = make_model(args.arch, args.out, train=args.train, seed=args.seed)
    print(f"wrote {args.arch} model to {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from placement.plan import PlanError, make_plan, write_plan

    try:
        manifest = _load(args.manifest)
        plan = make_plan(manifest)
    except ManifestError as e:
        for line in e.lines():
            print(line)
        return 2
    except PlanError as e:
        print(str(e))
        return 2
    write_plan(plan, args.out)
    summary = plan.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"plan: {summary['kind']} {summary['pools']} on {summary['gpus']} GPUs -> {args.out}")
        print(f"predicted goodput {summary['predicted_goodput_rps']:.3f} req/s "
              f"({summary['predicted_goodput_per_gpu']:.3f} per GPU), TTFT p90 "
              f"{summary['predicted_ttft_p90_ms']:.1f} ms, TPOT p90 {summary['predicted_tpot_p90_ms']:.1f} ms")
        for kind, alt in summary["best_of_each_kind"].items():
            print(f"  best {kind}: {alt['goodput_per_gpu']:.3f} per GPU on {alt['gpus']} GPUs {alt['pools']}")
    for miss in summary["slo_misses"]:
        over = miss["predicted_ms"] - miss["target_ms"]
        print(f"{miss['field']}: no layout meets it; best predicted p90 {miss['predicted_ms']:.1f} ms "
              f"vs target {miss['target_ms']:.1f} ms (over by {over:.1f} ms, "
              f"{miss['predicted_ms'] / miss['target_ms']:.1f}x)")
    return 3 if summary["slo_misses"] else 0


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    from placement.profile import cached_profile, quick_shapes

    manifest = _load(args.manifest)
    pools = manifest.pools.values()  # type: ignore[attr-defined]
    budget = max([p.max_num_batched_tokens for p in pools if p.max_num_batched_tokens] or [512])
    kwargs: dict[str, object] = {"max_batched_tokens": budget}
    if not args.full:
        # The shapes the manifest's workload reaches (placement.profile: why the full grid is slow).
        wl = manifest.workload  # type: ignore[attr-defined]
        max_context = int(wl.prompt_tokens[1] + wl.output_tokens[1])
        max_batch = min(16, max([p.max_num_seqs for p in pools if p.max_num_seqs] or [16]))
        sets, points = quick_shapes(max_context, max_batch, budget)
        kwargs.update(prefill_sets=sets, decode_points=points, repeats=2)
    result, path, hit = cached_profile(manifest.model_dir(), manifest.model.dtype, args.threads,  # type: ignore[attr-defined]
                                       refresh=args.refresh, **kwargs)
    print(f"profile: {'cached' if hit else 'measured'} {path}", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve", description="Disaggregated LLM serving on Ray")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a manifest over the OpenAI API")
    s.add_argument("manifest")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    s.set_defaults(func=cmd_serve)

    ap = sub.add_parser("apply", help="roll out a changed manifest on a running deployment (same name)")
    ap.add_argument("manifest")
    ap.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else auto)")
    ap.add_argument("--namespace", default="splitserve", help="Ray namespace of the deployment")
    ap.add_argument("--drain-timeout", type=float, default=None,
                    help="seconds an old worker may take to drain (default: server.request_timeout_s + 30)")
    ap.set_defaults(func=cmd_apply)

    dp = sub.add_parser("deploy", help="ray up a cluster, ship the project and manifest, serve it on the head")
    dp.add_argument("--cluster", required=True, help="Ray cluster-launcher YAML (deploy/clusters/)")
    dp.add_argument("--manifest", required=True)
    dp.add_argument("--no-up", action="store_true", help="the cluster is up: skip 'ray up'")
    dp.add_argument("--address", default=None, help="the head's GCS address (default: RAY_ADDRESS, the local "
                    "provider's head_ip, else 'ray get-head-ip')")
    dp.add_argument("--host", default=None, help="HTTP host on the head (default: the head's node IP)")
    dp.add_argument("--port", type=int, default=8000)
    dp.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for /health")
    dp.set_defaults(func=cmd_deploy)

    dn = sub.add_parser("down", help="stop what 'deploy' serves on a cluster; --teardown also runs 'ray down'")
    dn.add_argument("--cluster", required=True)
    dn.add_argument("--name", default=None, help="only this deployment (the manifest's name)")
    dn.add_argument("--address", default=None)
    dn.add_argument("--teardown", action="store_true")
    dn.set_defaults(func=cmd_down)

    v = sub.add_parser("validate", help="check a manifest; exit 2 with one line per problem")
    v.add_argument("manifest")
    v.add_argument("--plan-only", dest="servable", action="store_false",
                   help="skip the checks only serving needs (a model directory of config.json alone, "
                        "as planning manifests have, is then valid)")
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("make-model", help="write a tiny HF-format model, or convert a Llama-family GGUF")
    m.add_argument("--arch", choices=["llama", "mixtral"], default=None, help="a tiny random model")
    m.add_argument("--from-gguf", metavar="FILE", default=None,
                   help="convert this Llama-family GGUF (dequantized to fp32) instead")
    m.add_argument("--out", required=True)
    m.add_argument("--train", action="store_true", help="train it a few minutes on local text (cached)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make_model)

    pl = sub.add_parser("plan", help="fill a manifest's layout for its hardware, workload and SLO")
    pl.add_argument("manifest")
    pl.add_argument("--out", required=True, help="planned manifest to write")
    pl.add_argument("--json", action="store_true", help="print the prediction as JSON")
    pl.set_defaults(func=cmd_plan)

    pr = sub.add_parser("profile", help="measure this machine's engine and fit the latency model")
    pr.add_argument("manifest")
    pr.add_argument("--out", required=True, help="profile.json to write")
    pr.add_argument("--threads", type=int, default=1)
    pr.add_argument("--full", action="store_true",
                    help="the full grid of shapes (minutes on a real model), not the workload's corners")
    pr.add_argument("--refresh", action="store_true", help="measure again even if a cached profile matches")
    pr.set_defaults(func=cmd_profile)

    from benchmarks.bench import add_parser as add_bench

    add_bench(sub)
    try:
        from placement.experts import register as add_place_experts
    except ImportError:  # placement extras not installed
        pass
    else:
        add_place_experts(sub)
        from cluster.expert_stats import fetch_expert_loads

        # --from URL: placement/ knows no HTTP; the reader of a server's /metrics is ours.
        sub.choices["place-experts"].set_defaults(fetch_loads=fetch_expert_loads)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
