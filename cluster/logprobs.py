"""Log-probabilities in the OpenAI response formats, and the bytes of a token."""

from __future__ import annotations

import functools
import re
from typing import Any


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes a token stands for: byte-level BPE (GPT-2 alphabet), SentencePiece byte
    fallback (<0xHH>, '▁' for space), else the token's text (special tokens)."""
    raw = tokenizer.tk.id_to_token(token_id)
    if raw is None:
        return b""
    m = _BYTE_FALLBACK.match(raw)
    if m:
        return bytes([int(m.group(1), 16)])
    dec = _byte_decoder()
    if tokenizer.tk.token_to_id(raw) is not None and all(c in dec for c in raw) and not (
            raw.startswith("<") and raw.endswith(">") and len(raw) > 2):
        return bytes(dec[c] for c in raw)
    return raw.replace("\u2581", " ").encode()


class LogprobsBuilder:
    """Log-probabilities in OpenAI's formats: completions (tokens, token_logprobs,
    top_logprobs, text_offset) or chat (content: [{token, logprob, bytes, top_logprobs}]).
    A token's string is its bytes as text, or "bytes:\\xHH..." when they are not whole
    UTF-8 (OpenAI's convention), so distinct tokens never share a string; text offsets come
    from decoding the ids in order (a token that ends inside a UTF-8 character starts where
    its text appears)."""

    def __init__(self, tokenizer: Any, kind: str, k: int) -> None:
        self.tok = tokenizer
        self.kind = kind
        self.k = k
        self.detok = tokenizer.incremental_detokenizer()
        self.offset = 0
        self.all: dict[str, Any] | None = None

    def _str(self, token_id: int) -> str:
        b = self._bytes(token_id)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)

    def _bytes(self, token_id: int) -> bytes:
        return token_bytes(self.tok, token_id)

    def _offsets(self, ids: list[int]) -> list[int]:
        out = []
        for t in ids:
            out.append(self.offset)
            self.offset += len(self.detok.push([t]))
        return out

    def add_prompt(self, ids: list[int], lps: list[Any], echo_text: str) -> dict[str, Any]:
        frag = self._completion(ids, lps + [None] * (len(ids) - len(lps)), self._offsets(ids))
        self.detok.flush()
        self.detok = self.tok.incremental_detokenizer()  # the output's text follows the echo
        self.offset = len(echo_text)
        return self._keep(frag)

    def add(self, ids: list[int], lps: list[Any]) -> dict[str, Any]:
        offsets = self._offsets(ids)
        if self.kind == "completion":
            return self._keep(self._completion(ids, lps, offsets))
        content = []
        for t, (lp, top_ids, top_vals) in zip(ids, lps):
            s = self._str(t)
            content.append({"token": s, "logprob": lp, "bytes": list(self._bytes(t)),
                            "top_logprobs": [{"token": self._str(i), "logprob": v,
                                              "bytes": list(self._bytes(i))}
                                             for i, v in zip(top_ids, top_vals)]})
        return self._keep({"content": content, "refusal": None})

    def _completion(self, ids: list[int], lps: list[Any], offsets: list[int]) -> dict[str, Any]:
        frag: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": offsets}
        for t, entry in zip(ids, lps):
            frag["tokens"].append(self._str(t))
            if entry is None:
                frag["token_logprobs"].append(None)
                frag["top_logprobs"].append(None)
                continue
            lp, top_ids, top_vals = entry
            frag["token_logprobs"].append(lp)
            top = {self._str(i): v for i, v in zip(top_ids, top_vals)}
            top.setdefault(self._str(t), lp)  # the sampled token is always there (k + 1 at most)
            frag["top_logprobs"].append(top)
        return frag

    def _keep(self, frag: dict[str, Any]) -> dict[str, Any]:
        self.all = self.merge(self.all, frag)
        return frag

    @staticmethod
    def merge(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
        if a is None:
            return {k: (list(v) if isinstance(v, list) else v) for k, v in b.items()}
        return {k: (a[k] + v if isinstance(v, list) else v) for k, v in b.items()}

    def whole(self) -> dict[str, Any] | None:
        return self.all
