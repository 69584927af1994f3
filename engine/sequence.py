"""A request inside the engine: its tokens, sampling parameters and paged-KV bookkeeping."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SamplingParams:
    # 0 means greedy; otherwise logits are divided by it before sampling.
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    top_p: float = 1.0
    # Keep only the top_k most likely tokens; 0 or -1 disables.
    top_k: int = 0
    # Seed of this request's private generator; None draws from the worker's generator.
    seed: int | None = None
    # Tokens to generate at most (the first token counts).
    max_tokens: int = 16
    # Token ids that end the sequence (in addition to the model's EOS unless ignore_eos).
    stop_token_ids: list[int] = field(default_factory=list)
    # Keep generating past EOS (benchmarks that want fixed output lengths).
    ignore_eos: bool = False
    # OpenAI penalties over the generated tokens: logit -= frequency_penalty * count
    # + presence_penalty * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Hugging Face / vLLM (CTRL, Keskar et al. 2019): logits of tokens seen in the prompt or
    # the output are divided by it when positive, multiplied when negative. 1 disables.
    repetition_penalty: float = 1.0
    # EOS and stop_token_ids are masked until this many tokens were generated.
    min_tokens: int = 0
    # Added to the logits of these token ids before sampling (OpenAI logit_bias).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Log-probabilities of each sampled token and of the `logprobs` most likely tokens
    # (0: the sampled token only; None: none), from the raw logits.
    logprobs: int | None = None
    # The same for every prompt token after the first (echo), computed where the prompt is.
    prompt_logprobs: int | None = None
    # Structured output: an llguidance grammar (engine/guided.py) the output must match;
    # applied as a token mask after the processors.
    grammar: str | None = None

    @property
    def needs_processing(self) -> bool:
        """Whether any logits processor applies (penalties, min_tokens, bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sequence:
    """One request's tokens and where its KV lives. Pure bookkeeping, no tensors."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int] | None = None,
        output_token_ids: list[int] | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = list(output_token_ids or [])
        self.params = params
        self.eos_token_ids = [] if params.ignore_eos else list(eos_token_ids or [])
        self.status = SeqStatus.WAITING
        # Physical KV block ids, in order.
        self.block_table: list[int] = []
        # Tokens whose KV is already in the cache.
        self.num_computed_tokens = 0
        # Tokens whose KV was found in the prefix cache at the last admission.
        self.num_cached_tokens = 0
        # KV that arrives from elsewhere (a prefill worker) instead of being computed:
        # an opaque payload the runner writes into this sequence's blocks on admission.
        self.pending_kv: Any = None
        self.num_pending_kv_tokens = 0
        # Layer-wise KV streaming (prefill workers): hand each layer's new KV to the
        # transfer layer as it is computed; kv_streamed counts tokens already handed over.
        self.stream_kv = False
        self.kv_streamed = 0
        self.finish_reason: str | None = None
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.num_preemptions = 0
        # Prompt log-probabilities by prompt position (params.prompt_logprobs): entry p-1
        # is that of prompt token p, (logprob, top ids, top logprobs).
        self.prompt_logprobs: list[tuple[float, list[int], list[float]] | None] = []
        # Further choices of the same prompt (n > 1), forked once the prompt's KV is in
        # the cache: (request id, params, output ids so far or None to sample the first
        # token from this sequence's logits).
        self.children: list[tuple[str, SamplingParams, list[int] | None]] = []

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.value})"
        )
