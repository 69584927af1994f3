"""Real KV of a model and what a codec's loss does to it (no Ray): the held-out texts that
ship with every Python, the KV of a context, and the perplexity / greedy agreement of a
continuation scored with another KV in place of the exact one.

Used by the ``kvtc`` calibration (which measures each level's perplexity cost once per
model) and by ``benchmarks/kv_quality.py``. The engine is imported lazily (it is only
needed where a model runs).

Texts: prose is ``pydoc_data.topics`` (the Python reference's topics, sorted by name),
code is standard-library ``.py`` files. Calibration and evaluation never share a text:
``CALIB_*`` vs ``EVAL_*``.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Standard-library files: calibration and evaluation sets are disjoint.
CALIB_CODE = ("difflib.py", "textwrap.py")
EVAL_CODE = ("argparse.py", "inspect.py", "typing.py", "subprocess.py")
# pydoc topics (sorted by key): the first CALIB_PROSE_SHARE of the characters calibrate,
# the rest evaluates.
CALIB_PROSE_SHARE = 0.3


def prose_text() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def code_text(name: str) -> str:
    return (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(errors="replace")


def texts(which: str) -> list[tuple[str, str]]:
    """(label, text) of the calibration ("calib") or evaluation ("eval") set."""
    prose = prose_text()
    cut = int(len(prose) * CALIB_PROSE_SHARE)
    if which == "calib":
        return [("prose", prose[:cut])] + [(f"code:{n}", code_text(n)) for n in CALIB_CODE]
    if which == "eval":
        return [("prose", prose[cut:])] + [(f"code:{n}", code_text(n)) for n in EVAL_CODE]
    raise ValueError(f"texts are 'calib' or 'eval', not {which!r}")


def windows(tok: Any, which: str, count: int, ctx: int, cont: int) -> list[tuple[str, list[int]]]:
    """count windows of ctx + cont tokens, alternating prose and code (round robin over
    the texts; several windows of one text are spread over it)."""
    items = texts(which)
    # tokenize only a prefix of each text that holds its share of windows (~4 characters
    # a token, with room to spare)
    chars = 8 * (ctx + cont) * (count // len(items) + 1)
    toks = [(label, tok.encode(t[:chars], add_special_tokens=False)) for label, t in items]
    out: list[tuple[str, list[int]]] = []
    per: dict[int, int] = {}
    i = 0
    while len(out) < count and i < 50 * max(1, count):
        j = i % len(toks)
        label, ids = toks[j]
        k = per.get(j, 0)
        n = len(ids) // (ctx + cont)
        if k < n:
            stride = (len(ids) - ctx - cont) // max(1, n - 1) if n > 1 else 0
            # spread: k-th window of this text at a different place each time
            pos = ((k * 7919) % n) * stride if n > 1 else 0
            out.append((f"{label}@{pos}", ids[pos:pos + ctx + cont]))
            per[j] = k + 1
        i += 1
    if len(out) < count:
        raise ValueError(f"the {which} texts hold only {len(out)} windows of {ctx}+{cont} tokens")
    return out


@dataclass
class Scored:
    """One continuation scored with one KV."""

    nll: float  # summed over the scored tokens
    tokens: int
    argmax: list[int]  # greedy (teacher-forced) choice at every scored position
    logprobs: torch.Tensor | None = field(default=None, repr=False)  # [tokens, vocab], log-softmax
    token_nll: torch.Tensor | None = field(default=None, repr=False)  # [tokens - 1]: NLL of each scored token


class Probe:
    """A model in a paged cache of its own, fp32 compute: prefill a context, export its
    KV, score a continuation with any KV imported in its place."""

    def __init__(self, model_dir: str | Path, max_tokens: int, block_size: int = 16) -> None:
        from engine.loader import load_model, load_tokenizer
        from engine.model import allocate_kv_cache
        from engine.runner import ModelRunner

        self.model_dir = Path(model_dir)
        self.tok = load_tokenizer(self.model_dir)
        self.model = load_model(self.model_dir, torch.float32)
        self.bs = block_size
        nb = max_tokens // block_size + 2
        self.runner = ModelRunner(self.model, allocate_kv_cache(self.model.cfg, nb, block_size, torch.float32),
                                  block_size)
        self.table = list(range(nb))

    @torch.no_grad()
    def forward(self, ids: list[int], start: int, all_logits: bool = True) -> torch.Tensor:
        from engine.attention_metadata import AttentionMetadata
        from engine.runner import StepInput, _slots

        end = start + len(ids)
        meta = AttentionMetadata([len(ids)], [end], [self.table], _slots(self.table, start, end, self.bs), self.bs)
        rows = torch.arange(len(ids)) if all_logits else torch.tensor([len(ids) - 1])
        logits = self.runner.execute(StepInput(torch.tensor(ids), torch.arange(start, end), meta, rows)).logits
        assert logits is not None
        return logits.float()

    def context_kv(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        """KV [layers, 2, len(ids), kv_heads, head_dim] (fp32) of a context and the greedy
        token after it."""
        first = int(self.forward(ids, 0, all_logits=False).argmax())
        return self.runner.export_kv(self.table, len(ids)), first

    @torch.no_grad()
    def score(self, kv: torch.Tensor, cont: list[int], keep_logprobs: bool = False) -> Scored:
        """Teacher-forced continuation after a context whose KV is kv: the NLL of cont[1:]
        (cont[0] is fed, the rest predicted) and the argmax at every position."""
        ctx = kv.shape[2]
        self.runner.import_kv(self.table, kv.float())
        logp = torch.log_softmax(self.forward(cont, ctx), dim=-1)
        tok = -logp[:-1].gather(1, torch.tensor(cont[1:])[:, None])[:, 0]
        return Scored(float(tok.sum()), len(cont) - 1, logp.argmax(dim=-1).tolist(), logp if keep_logprobs else None,
                      tok)

    @torch.no_grad()
    def greedy(self, kv: torch.Tensor, first: int, n: int) -> list[int]:
        """n greedy tokens after a context whose KV is kv (first: the token after it)."""
        ctx = kv.shape[2]
        self.runner.import_kv(self.table, kv.float())
        out = [first]
        for i in range(n - 1):
            out.append(int(self.forward([out[-1]], ctx + i, all_logits=False).argmax()))
        return out


def kl_tokens(ref: Scored, other: Scored) -> torch.Tensor:
    """KL(ref || other) of the next-token distribution at each scored position."""
    assert ref.logprobs is not None and other.logprobs is not None
    p = ref.logprobs[:-1]
    return (p.exp() * (p - other.logprobs[:-1])).sum(dim=-1)


def kl(ref: Scored, other: Scored) -> float:
    """Mean KL(ref || other) of the next-token distributions over the scored positions."""
    return float(kl_tokens(ref, other).mean())


def ppl_change_pct(nll: float, nll0: float, tokens: int) -> float:
    return 100 * (math.exp((nll - nll0) / max(1, tokens)) - 1)

