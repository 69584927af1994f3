"""The engine step: schedule, run, sample, postprocess. No Ray, no HTTP.

Workers wrap an ``LLMEngine``; tests drive it directly. The model executor is a
parameter, so a tensor-parallel worker can fan a step out to its ranks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.alloc import tune_malloc
from engine.block_manager import BlockManager
from engine.runner import ModelRunner, PromptRows, StepInput, StepResult, prepare_step
from engine.sampler import Sampler, TokenLogprobs, token_logprobs
from engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from engine.sequence import SamplingParams, Sequence, SeqStatus
from engine.step_threads import StepThreads

logger = logging.getLogger(__name__)

Executor = Callable[[StepInput], StepResult]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepOutput:
    # Token sampled this step, by request id.
    new_tokens: dict[str, int] = field(default_factory=dict)
    # Log-probabilities of those tokens, for requests that asked (params.logprobs).
    new_logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # Prompt log-probabilities (params.prompt_logprobs), by request id, with the request's
    # first sampled token: entry p-1 scores prompt token p.
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    # Sequences that finished this step (finish_reason set).
    finished: list[Sequence] = field(default_factory=list)
    # KV of sequences that finished prefill (prefill-only engines), full heads.
    exported_kv: dict[str, torch.Tensor] = field(default_factory=dict)
    # Sequences preempted by this step.
    preempted: list[Sequence] = field(default_factory=list)
    # Tokens computed by this step.
    num_tokens: int = 0


def build_runner(model_dir: str | Path, dtype: str, num_blocks: int, block_size: int,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: object = None,
                 decodes: bool = True) -> ModelRunner:
    """The model and KV cache of one rank. With SPLITSERVE_COMPILE=decode and decodes
    (not a prefill-only worker), the compiled decode forward (engine.compiled) is built
    and compiled here, before any request (a minute or more on a cold inductor cache)."""
    from engine.compiled import compile_mode
    from engine.paged_kernel import wanted
    from engine.linear import pack_model
    from engine.loader import load_model
    from engine.model import allocate_kv_cache

    tune_malloc()  # once per process: step temporaries stay in the heap (engine/alloc.py)
    torch_dtype = DTYPES[dtype]
    model = load_model(model_dir, torch_dtype, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
    pack_model(model)  # oneDNN-packed linears on CPU (engine/linear.py; SPLITSERVE_LINEAR=torch: off)
    caches = allocate_kv_cache(model.cfg, num_blocks, block_size, torch_dtype, tp_size=tp_size)
    runner = ModelRunner(model, caches, block_size, tp_rank=tp_rank, tp_size=tp_size)
    if decodes:
        wanted(torch_dtype, caches[0].device)  # compiles (or loads) the kernel now where it applies
    if decodes and compile_mode() == "decode":
        if not runner.enable_compile():
            logger.info("SPLITSERVE_COMPILE=decode: not supported for this model or tp; eager")
        else:
            try:
                logger.info("compiled decode forward ready in %.1f s", runner.compiled.warmup())
            except Exception as e:  # noqa: BLE001 - compile errors vary; eager is the fallback
                runner.compiled.broken = f"{type(e).__name__}: {e}"
                logger.warning("compiling the decode forward failed, eager: %s", runner.compiled.broken)
    return runner


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler_config: SchedulerConfig,
        num_blocks: int,
        eos_token_ids: list[int] | None = None,
        executor: Executor | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        model_dir: str | Path | None = None,
        step_threads: StepThreads | None = None,
    ) -> None:
        self.runner = runner
        self.block_size = runner.block_size
        self.bm = BlockManager(num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.bm)
        # model_dir: where the tokenizer is, for structured output (grammar masks).
        self.sampler = Sampler(seed, None if model_dir is None else str(model_dir))
        self.eos_token_ids = list(eos_token_ids or [])
        self.executor: Executor = executor or runner.execute
        # Torch threads per step (engine.step_threads): set on the thread that steps.
        self.step_threads = step_threads
        self._seqs: dict[str, Sequence] = {}
        # Sequences whose blocks were reserved (``reserve``) while their KV is written in
        # off the engine thread; not scheduled until ``add_request(..., reserved=True)``.
        self._reserved: dict[str, Sequence] = {}
        # Guards the block manager and scheduler between the engine thread (schedule,
        # postprocess, abort) and ``reserve`` / ``release_reservation`` from other threads.
        self._lock = threading.RLock()
        if scheduler_config.prefill_only and getattr(runner, "compiled", None) is not None:
            runner.compiled = None  # never decodes

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, dtype: str = "float32", num_blocks: int = 512,
                       block_size: int = 16, scheduler_config: SchedulerConfig | None = None,
                       **kw: object) -> "LLMEngine":
        from engine.config import ModelConfig

        cfg = ModelConfig.from_dir(model_dir)
        runner = build_runner(model_dir, dtype, num_blocks, block_size)
        sc = scheduler_config or SchedulerConfig(max_model_len=cfg.max_position_embeddings)
        kw.setdefault("model_dir", model_dir)
        return cls(runner, sc, num_blocks, eos_token_ids=cfg.eos_token_ids, **kw)  # type: ignore[arg-type]

    # -- requests -------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    output_token_ids: list[int] | None = None,
                    pending_kv: torch.Tensor | None = None, stream_kv: bool = False,
                    children: list[tuple[str, SamplingParams, list[int] | None]] | None = None,
                    reserved: bool = False) -> Sequence:
        """Queue a request. With pending_kv ([layers, 2, tokens, kvh, hd] for the first
        tokens of the prompt), those tokens are not computed: their KV is written in, the
        rest of the prompt (a suffix whose KV was not sent: recompute) and
        output_token_ids (which then holds the token the prefill sampled) are computed, and
        decoding continues. With stream_kv, each layer's new KV goes to the runner's
        ``on_layer_kv`` as it is computed (prefill workers).

        children are further choices of the same prompt (n > 1): (request id, params,
        output ids so far or None). They share this sequence's prompt KV: once it is in the
        cache they fork off (shared full blocks, a copied partial block), their first token
        sampled from this sequence's last prompt logits with their own params and seed
        stream unless given. A prefill-only engine just samples their first tokens.

        With reserved, the sequence made by ``reserve`` (its KV already written into its
        blocks) joins the queue; prompt_token_ids, params and output_token_ids are those
        given to ``reserve``."""
        ids = [request_id] + [c[0] for c in children or ()]
        if any(i in self._seqs for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"duplicate request id among {ids!r}")
        if reserved:
            with self._lock:
                seq = self._reserved.pop(request_id, None)
                if seq is None:
                    raise ValueError(f"no blocks were reserved for {request_id!r}")
                seq.num_computed_tokens = seq.num_pending_kv_tokens
                seq.num_pending_kv_tokens = 0
                seq.children = list(children or [])
                try:
                    for _, p, _ in seq.children:
                        self.scheduler.check_fits(len(seq.prompt_token_ids), p.max_tokens)
                    self.scheduler.add(seq)
                except BaseException:
                    self.bm.free(seq)
                    raise
            self._seqs[request_id] = seq
            return seq
        seq = Sequence(request_id, prompt_token_ids, params, self.eos_token_ids, output_token_ids)
        if pending_kv is not None:
            if pending_kv.shape[2] > len(prompt_token_ids):
                raise ValueError(
                    f"KV covers {pending_kv.shape[2]} tokens, prompt has {len(prompt_token_ids)}")
            if pending_kv.shape[2] > 0:
                seq.pending_kv = pending_kv
                seq.num_pending_kv_tokens = int(pending_kv.shape[2])
        seq.stream_kv = stream_kv
        seq.children = list(children or [])
        for _, p, _ in seq.children:
            self.scheduler.check_fits(len(prompt_token_ids), p.max_tokens)
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        return seq

    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                output_token_ids: list[int] | None, num_kv_tokens: int) -> list[int] | None:
        """Blocks for a request whose first num_kv_tokens tokens of KV arrive from
        elsewhere, so that the caller can write them in (``runner.write_kv``) from any
        thread while steps run: no scheduled sequence holds these blocks. Returns the block
        table, or None when the blocks are not free now. Thread-safe. The caller then calls
        ``add_request(..., reserved=True)``, or ``release_reservation`` (only once nothing
        writes into the blocks any more)."""
        if request_id in self._seqs or request_id in self._reserved:
            raise ValueError(f"duplicate request id {request_id!r}")
        seq = Sequence(request_id, prompt_token_ids, params, self.eos_token_ids, output_token_ids)
        if not 0 < num_kv_tokens <= len(prompt_token_ids):
            raise ValueError(f"KV covers {num_kv_tokens} tokens, prompt has {len(prompt_token_ids)}")
        self.scheduler.check_fits(len(prompt_token_ids), params.max_tokens)
        with self._lock:
            # First come, first served: not ahead of waiting requests that still need blocks.
            if any(not s.block_table for s in self.scheduler.waiting) or not self.bm.can_allocate(seq, seq.num_tokens):
                return None
            self.bm.allocate(seq, seq.num_tokens)
            seq.num_pending_kv_tokens = num_kv_tokens
            self._reserved[request_id] = seq
        return list(seq.block_table)

    def release_reservation(self, request_id: str) -> bool:
        """Give back the blocks of a reservation not (yet) added. Thread-safe; idempotent."""
        with self._lock:
            seq = self._reserved.pop(request_id, None)
            if seq is None:
                return False
            self.bm.free(seq)
            return True

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        with self._lock:
            seq = self._seqs.pop(request_id, None)
            if seq is None:
                return False
            self.scheduler.finish(seq, reason)
        self.sampler.forget(request_id)
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the step -------------------------------------------------------------------
    def step(self) -> StepOutput:
        with self._lock:
            batch: ScheduledBatch = self.scheduler.schedule()
        out = StepOutput(preempted=list(batch.preempted))
        if batch.is_empty and not batch.kv_imports and not batch.block_copies:
            return out
        if self.step_threads is not None:
            self.step_threads.apply(batch.num_tokens)
        prompt_rows = PromptRows()
        step_input, sample_seqs = prepare_step(
            batch, self.block_size, export_on_sample=self.scheduler.config.prefill_only,
            prompt_rows=prompt_rows)
        result = self.executor(step_input)
        if prompt_rows.seqs:
            assert result.prompt_logits is not None
            self._score_prompts(result.prompt_logits, prompt_rows)
        sampled: dict[str, int] = {}
        # Choices forked this step: (parent, child) with the child's first token set.
        forks: list[tuple[Sequence, Sequence]] = []
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.children and seq.num_computed_tokens + n >= len(seq.prompt_token_ids):
                for cid, cparams, couts in seq.children:
                    child = Sequence(cid, seq.prompt_token_ids, cparams, self.eos_token_ids, couts)
                    forks.append((seq, child))
                seq.children = []
        to_sample = [c for _, c in forks if not c.output_token_ids]
        if sample_seqs:
            assert result.logits is not None
            row_of = {id(s): i for i, s in enumerate(sample_seqs)}
            parent_of = {id(c): p for p, c in forks}
            rows = list(range(len(sample_seqs))) + [row_of[id(parent_of[id(c)])] for c in to_sample]
            logits = result.logits if not to_sample else result.logits[torch.tensor(rows)]
            res = self.sampler.sample(logits, sample_seqs + to_sample)
            sampled = {s.request_id: t for s, t in zip(sample_seqs, res.tokens)}
            for s, lp in zip(sample_seqs + to_sample, res.logprobs):
                if lp is not None:
                    out.new_logprobs[s.request_id] = lp
                if s.params.prompt_logprobs is not None and not s.output_token_ids and s in sample_seqs:
                    out.prompt_logprobs[s.request_id] = [None] + list(s.prompt_logprobs)
            out.new_tokens.update(sampled)
            parent_lps = {id(p): out.prompt_logprobs.get(p.request_id) for p, _ in forks}
            for c, t in zip(to_sample, res.tokens[len(sample_seqs):]):
                c.output_token_ids.append(t)
                out.new_tokens[c.request_id] = t
                if parent_lps.get(id(parent_of[id(c)])) is not None:
                    out.prompt_logprobs[c.request_id] = parent_lps[id(parent_of[id(c)])]
        out.exported_kv = result.exported
        out.num_tokens = batch.total_tokens
        with self._lock:
            # Forks take the prompt KV before the parent may finish (and free it) below.
            for parent, child in forks:
                reason = (self.scheduler.stop_reason(child, child.output_token_ids[-1])
                          if child.request_id in out.new_tokens else None)
                if reason is not None:
                    child.status = SeqStatus.FINISHED
                    child.finish_reason = reason
                    out.finished.append(child)
                    continue
                self.scheduler.fork(parent, child)
                self._seqs[child.request_id] = child
            out.finished += self.scheduler.postprocess(batch, sampled)
        for seq in out.finished:
            self._seqs.pop(seq.request_id, None)
            self.sampler.forget(seq.request_id)
        return out

    @staticmethod
    def _score_prompts(logits: torch.Tensor, pr: PromptRows) -> None:
        for seq, (row, first, count) in zip(pr.seqs, pr.rows):
            k = seq.params.prompt_logprobs or 0
            targets = torch.tensor(seq.prompt_token_ids[first:first + count], dtype=torch.long)
            got = token_logprobs(logits[row:row + count], targets, k)
            if first == 1:
                seq.prompt_logprobs = []
            del seq.prompt_logprobs[first - 1:]
            seq.prompt_logprobs.extend(got)

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 max_steps: int = 100_000) -> list[list[int]]:
        """Run prompts to completion (tests, offline use); returns output token ids."""
        return run_to_completion(self, prompts, params, max_steps)

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": self.bm.num_blocks,
            "kv_blocks_free": self.bm.num_free_blocks,
            "kv_blocks_cached": self.bm.num_cached_blocks,
            "prefix_hits": self.bm.prefix_hits,
            "prompt_tokens_computed": self.scheduler.prompt_tokens_computed,
        }


def run_to_completion(engine: object, prompts: list[list[int]], params: SamplingParams,
                      max_steps: int) -> list[list[int]]:
    """The offline loop of every engine (ours, vLLM's behind ours): add the prompts as
    requests gen-0.., step until nothing is left, return each one's output token ids."""
    seqs = [engine.add_request(f"gen-{i}", p, params) for i, p in enumerate(prompts)]  # type: ignore[attr-defined]
    for _ in range(max_steps):
        if not engine.has_work:  # type: ignore[attr-defined]
            break
        engine.step()  # type: ignore[attr-defined]
    else:
        raise RuntimeError(f"generate did not finish within {max_steps} steps")
    return [s.output_token_ids for s in seqs]
