"""What the layout search takes and gives: the workload it simulates, the SLO it scores
against, and a layout with its predicted goodput."""

from __future__ import annotations

from dataclasses import dataclass, field

from placement.simulator import SimRequest, poisson_requests


@dataclass(frozen=True)
class Workload:
    # Prompt and output lengths are drawn uniformly from these ranges (tokens).
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    num_requests: int = 400
    seed: int = 0
    # Arrivals must span at least this long (else a high rate is only a short burst that
    # drains within the SLO), up to max_requests.
    min_duration_s: float = 60.0
    max_requests: int = 4000

    def requests(self, rate: float) -> list[SimRequest]:
        lo_p, hi_p = self.prompt_range
        lo_o, hi_o = self.output_range
        n = int(min(max(self.num_requests, rate * self.min_duration_s), self.max_requests))
        return poisson_requests(rate, n, lambda g: int(g.integers(lo_p, hi_p + 1)),
                                lambda g: int(g.integers(lo_o, hi_o + 1)), self.seed)

    @property
    def mean_prompt(self) -> float:
        return sum(self.prompt_range) / 2

    @property
    def mean_output(self) -> float:
        return sum(self.output_range) / 2


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


@dataclass
class Layout:
    mode: str  # "colocated" | "disaggregated"
    # Per pool: tp, pp, replicas, node of each replica (and, colocated, the step budget).
    pools: dict[str, dict[str, object]]
    gpus: int
    goodput_rps: float
    ttft_p90_s: float = float("nan")
    tpot_p90_s: float = float("nan")
    notes: list[str] = field(default_factory=list)
    # "disaggregated", "disaggregated/ae", "colocated/chunked", "colocated/whole" or
    # "colocated/prefill-first" (see placement.search).
    kind: str = ""

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_rps / max(1, self.gpus)
