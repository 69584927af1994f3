"""vLLM's v1 engine behind the interface of splitserve's ``LLMEngine`` (add_request,
abort, step -> StepOutput, has_work, stats), so workers, router and controller do not
branch on the engine. No Ray. vLLM is an optional dependency, imported here only.

vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: its ``LLMEngine`` with an
in-process engine core, stepped by the worker's engine thread like the native engine).
vLLM's ``AsyncLLM`` always runs its engine core in a child process
(vllm/v1/engine/core_client.py: asyncio mode requires multiprocessing), where splitserve's
KV connector could not reach the worker's kvtransfer objects and which a killed Ray actor
would orphan.

Roles:
- ``prefill``: each request runs to its first token (``max_tokens=1``); the connector
  saves its prompt KV layer by layer (streamed to kvtransfer's sender, or into an export
  tensor returned in ``StepOutput.exported_kv``).
- ``decode``: a request may come with its prompt KV (``pending_kv``) and the token the
  prefill sampled (``output_token_ids``); vLLM gets prompt + that token as its prompt,
  the connector writes the KV into the blocks vLLM allocated, and vLLM computes only
  the sampled token (and any prompt suffix the sender left to recompute), then decodes.
  Without KV it is a whole request (colocated serving).
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from engine.engine import DTYPES, StepOutput, run_to_completion
from engine.errors import UnsupportedRequestError
from engine.sequence import SamplingParams

logger = logging.getLogger(__name__)


# The engine id of this process's vLLM engine (one per process).
_LIVE: str | None = None


def vllm_environment(kv_bytes: int) -> None:
    """What vLLM wants from the environment here, set before it is imported/built.
    An operator's own values win."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the connector must run in this process
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # Ray's num_cpus decides
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(kv_bytes / 2**30))))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@dataclass
class VSeq:
    """What workers read of a request (the fields of engine.sequence.Sequence they use)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_scheduled_time: float | None = None
    num_cached_tokens: int = 0


class VLLMEngine:
    def __init__(self, model_dir: str | Path, dtype: str, num_blocks: int, block_size: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int, role: str,
                 enable_prefix_caching: bool = True, seed: int = 0) -> None:
        from engine.config import ModelConfig
        from engine import vllm_channel

        global _LIVE
        if _LIVE is not None:
            raise RuntimeError("one vLLM engine per process: vLLM keeps its KV connector in a "
                               "process-wide global (vllm.distributed.kv_transfer)")
        if role not in ("prefill", "decode"):
            raise ValueError(f"unknown role {role!r}; allowed: prefill, decode")
        self.role = role
        cfg = ModelConfig.from_dir(model_dir)
        self.cfg = cfg
        torch_dtype = DTYPES[dtype]
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        kv_bytes = (num_blocks + 1) * block_size * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads \
            * cfg.head_dim * itemsize
        vllm_environment(kv_bytes)
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine as VllmLLMEngine

        self.engine_id = f"splitserve-{uuid.uuid4().hex[:12]}"
        self.channel = vllm_channel.Channel(self.engine_id, cfg.num_hidden_layers, cfg.num_key_value_heads,
                                            cfg.head_dim, torch_dtype)
        vllm_channel.register(self.channel)
        # What prefill workers set (kvtransfer's stream sender) lands in the channel.
        self.runner = _Runner(self.channel, cfg)
        args = EngineArgs(
            model=str(model_dir), dtype=dtype, seed=seed, enforce_eager=True, max_model_len=max_model_len,
            block_size=block_size, num_gpu_blocks_override=num_blocks + 1,  # +1: vLLM's null block
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max(max_num_batched_tokens, block_size),
            enable_prefix_caching=enable_prefix_caching, disable_log_stats=True,
            disable_hybrid_kv_cache_manager=True, async_scheduling=False,
            kv_transfer_config=KVTransferConfig(
                kv_connector="SplitServeConnector", kv_connector_module_path="kvtransfer.vllm_connector",
                kv_role="kv_both", engine_id=self.engine_id, kv_load_failure_policy="fail"),
        )
        try:
            self.llm = VllmLLMEngine.from_engine_args(args)
        except Exception:
            vllm_channel.unregister(self.engine_id)
            raise
        _LIVE = self.engine_id
        core = self.llm.engine_core.engine_core  # InprocClient -> EngineCore
        self._sched = core.scheduler
        self._pool = core.scheduler.kv_cache_manager.block_pool
        self.block_size = block_size
        self._seqs: dict[str, VSeq] = {}
        self._params_cls = None
        self.scheduler = SimpleNamespace(running=[], waiting=[])  # what a failed step fails
        self.eos_token_ids = list(cfg.eos_token_ids)

    # -- requests ---------------------------------------------------------------------
    def _vllm_params(self, p: SamplingParams, max_tokens: int, kv_params: dict[str, Any],
                     done: int = 0) -> Any:
        from vllm import SamplingParams as VParams
        from vllm.sampling_params import RequestOutputKind

        if p.logprobs is not None or p.prompt_logprobs is not None:
            raise UnsupportedRequestError("logprobs are not supported on vLLM pools yet; use a native pool",
                                          "logprobs")
        if p.grammar is not None:
            raise UnsupportedRequestError("structured output (response_format, guided_*, forced tool calls) "
                                          "is not supported on vLLM pools yet; use a native pool", "response_format")
        if done and (p.presence_penalty or p.frequency_penalty):
            raise UnsupportedRequestError("presence/frequency penalties are not supported on disaggregated "
                                          "vLLM pools yet (vLLM would not count the token the prefill sampled); "
                                          "use a native pool", "presence_penalty" if p.presence_penalty
                                          else "frequency_penalty")
        return VParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else 0,
                       seed=p.seed, max_tokens=max_tokens, stop_token_ids=list(p.stop_token_ids),
                       ignore_eos=p.ignore_eos, presence_penalty=p.presence_penalty,
                       frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
                       min_tokens=max(0, p.min_tokens - done), logit_bias=dict(p.logit_bias) or None,
                       detokenize=False, output_kind=RequestOutputKind.DELTA,
                       extra_args={"kv_transfer_params": kv_params})

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    output_token_ids: list[int] | None = None, pending_kv: torch.Tensor | None = None,
                    stream_kv: bool = False,
                    children: list[tuple[str, SamplingParams, list[int] | None]] | None = None) -> VSeq:
        from engine.vllm_channel import channel_params

        if children:
            raise UnsupportedRequestError("n > 1 is not supported on vLLM pools yet; use a native pool", "n")
        if request_id in self._seqs:
            raise ValueError(f"duplicate request id {request_id!r}")
        done = list(output_token_ids or [])
        prompt = list(prompt_token_ids) + done
        if self.role == "prefill":
            if done:
                raise ValueError("a prefill request carries no output tokens")
            # Checked (and refused) before anything is held for the request in the channel.
            vp = self._vllm_params(params, 1, channel_params(request_id, save=True))
            self.channel.expect_save(request_id, len(prompt_token_ids), stream_kv)
        else:
            load = pending_kv is not None and pending_kv.shape[2] > 0
            if load:
                assert pending_kv is not None
                if pending_kv.shape[2] > len(prompt_token_ids):
                    raise ValueError(f"KV covers {pending_kv.shape[2]} tokens, prompt has {len(prompt_token_ids)}")
            left = params.max_tokens - len(done)
            if left < 1:
                raise ValueError(f"max_tokens={params.max_tokens} already reached by {len(done)} tokens")
            vp = self._vllm_params(params, left, channel_params(request_id, load=load), len(done))
            if load:
                with self.channel.lock:
                    self.channel.loads[request_id] = pending_kv
        seq = VSeq(request_id, list(prompt_token_ids), done)
        self._seqs[request_id] = seq
        try:
            self.llm.add_request(request_id, {"prompt_token_ids": prompt}, vp)
        except Exception:
            self._seqs.pop(request_id, None)
            self.channel.forget(request_id)
            raise
        return seq

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.llm.abort_request([request_id])
        self.channel.forget(request_id)
        seq.finish_reason = reason
        return True

    @property
    def has_work(self) -> bool:
        return bool(self._seqs) or self.llm.has_unfinished_requests()

    # -- the step -----------------------------------------------------------------------
    def step(self) -> StepOutput:
        n_before = self._sched_tokens()
        outs = self.llm.step()
        out = StepOutput(num_tokens=max(0, self._sched_tokens() - n_before))
        for o in outs:
            seq = self._seqs.get(o.request_id)
            if seq is None:
                continue
            comp = o.outputs[0]
            new = list(comp.token_ids)
            if len(new) > 1:
                raise RuntimeError(f"vLLM returned {len(new)} tokens for {o.request_id} in one step; "
                                   "splitserve's workers take one per step (no speculative decoding)")
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.channel.first_scheduled.get(seq.request_id, time.monotonic())
            if new:
                seq.output_token_ids += new
                out.new_tokens[seq.request_id] = new[0]
            if o.num_cached_tokens:
                seq.num_cached_tokens = int(o.num_cached_tokens)
            if o.finished:
                seq.finish_reason = str(comp.finish_reason or "stop")
                err = self.channel.load_errors.get(seq.request_id)
                if err is not None:
                    seq.finish_reason = "error"
                    logger.error("KV load of %s failed: %s", seq.request_id, err)
                if self.role == "prefill":
                    kv = self.channel.take_export(seq.request_id)
                    if kv is not None:
                        out.exported_kv[seq.request_id] = kv
                self.channel.forget(seq.request_id)
                self._seqs.pop(seq.request_id, None)
                out.finished.append(seq)
        self.scheduler.running = list(self._seqs.values())
        return out

    def _sched_tokens(self) -> int:
        return self.channel.saved_tokens + sum(len(s.output_token_ids) for s in self._seqs.values())

    def generate(self, prompts: list[list[int]], params: SamplingParams, max_steps: int = 100_000) -> list[list[int]]:
        """Run prompts to completion (tests); returns output token ids."""
        return run_to_completion(self, prompts, params, max_steps)

    def stats(self) -> dict[str, int]:
        total = self._pool.num_gpu_blocks - 1  # the null block is never free
        return {"running": len(self._sched.running), "waiting": len(self._sched.waiting),
                "kv_blocks_total": total, "kv_blocks_free": self._pool.get_num_free_blocks(),
                "prefix_hits": 0, "kv_channel_held": self.channel.held(),
                "kv_loads": self.channel.loaded, "kv_saved_tokens": self.channel.saved_tokens}

    def shutdown(self) -> None:
        from engine import vllm_channel

        vllm_channel.unregister(self.engine_id)


class _Runner(SimpleNamespace):
    """The attributes of engine.runner.ModelRunner that workers touch."""

    def __init__(self, channel: Any, cfg: Any) -> None:
        super().__init__(model=SimpleNamespace(cfg=cfg))
        object.__setattr__(self, "_channel", channel)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "on_layer_kv":
            self._channel.on_layer_kv = value
        super().__setattr__(name, value)
