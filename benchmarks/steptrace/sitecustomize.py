"""Diagnostic hook (issue 5): log every ``LLMEngine.step`` of every Python process that
has this directory on its path, workers included, without touching worker code.

    mkdir -p /tmp/steps
    SPLITSERVE_STEPTRACE_DIR=/tmp/steps PYTHONPATH=benchmarks/steptrace:. \
        python -m benchmarks.bench --manifest ... --out ...

Ray workers inherit PYTHONPATH, so each worker writes /tmp/steps/steps-<pid>.jsonl, one
line a step: wall-clock start "t", duration "dt" (s), "po" (prefill-only engine), the
batch's chunk lengths "n", the engine thread's CPU time in the step "cpu" (s), the
context computed before each chunk "ctx", and the lengths of KV imported this step "imp". Without SPLITSERVE_STEPTRACE_DIR it does nothing.
It is how the served step times were compared with placement.profile's (served steps
ran 1.2-1.7x the profiled ones on this shared machine; decode steps grew ~0.5-1 ms per
sequence with the token streaming beside them).
"""
import os, sys
_DIR = os.environ.get("SPLITSERVE_STEPTRACE_DIR")
if _DIR:
    import importlib.abc, importlib.machinery, json, time

    def _patch(mod):
        eng = mod.LLMEngine
        sched_mod = sys.modules["engine.scheduler"]
        orig_sched = sched_mod.Scheduler.schedule
        def schedule(self):
            b = orig_sched(self)
            self._trace_last = b
            self._trace_ctx = [x.num_computed_tokens for x in b.seqs]
            return b
        sched_mod.Scheduler.schedule = schedule
        orig = eng.step
        f = open(os.path.join(_DIR, f"steps-{os.getpid()}.jsonl"), "a", buffering=1)
        def step(self):
            t0 = time.time(); p0 = time.perf_counter(); c0 = time.thread_time()
            out = orig(self)
            dt = time.perf_counter() - p0
            cpu = time.thread_time() - c0
            b = getattr(self.scheduler, "_trace_last", None)
            if b is not None and (b.seqs or b.kv_imports):
                ctx = self.scheduler._trace_ctx
                f.write(json.dumps({"t": t0, "dt": dt, "cpu": cpu, "po": self.scheduler.config.prefill_only,
                                    "n": b.num_tokens, "ctx": ctx,
                                    "imp": [s.num_pending_kv_tokens for s in b.kv_imports]}) + "\n")
            return out
        eng.step = step

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "engine.engine":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            sys.meta_path.insert(0, self)
            if spec is None:
                return None
            loader = spec.loader
            class L(importlib.abc.Loader):
                def create_module(self, s): return loader.create_module(s)
                def exec_module(self, m):
                    loader.exec_module(m); _patch(m)
            spec.loader = L()
            return spec
    sys.meta_path.insert(0, _Finder())
