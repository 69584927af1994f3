"""The layout of ``cachegen`` streams (``kvtc``'s too), shared by the codecs and the
entropy stage: the options struct, its flags and the payload's sections. Imports nothing
of the project.

Options: level, group, flags, exact head and tail tokens, tables fingerprint (kvtc: its
calibration's), first layer. Payload: eight u64 section lengths, then the sections
``exact`` (raw head/tail tokens), ``delta`` (fp32 step per layer and K/V), ``mode``
(delta-mode bit per channel), ``buckets`` (5-bit table choice per row), ``tables``
(zlib'd uint16 counts of the used tables, of the coded part ``symbol >> SPLIT_BITS[bucket]``;
empty when calibrated), ``escapes`` (int32 counts per role, then values), ``low`` (the
``SPLIT_BITS`` raw low bits of the symbols of wide buckets, packed per bucket) and
``words`` (the rANS-coded symbols, two per coded symbol where the alphabet allows).
"""

from __future__ import annotations

import struct
from typing import Any

# level, group, flags, exact head, exact tail, tables fingerprint, first layer
OPTS = struct.Struct("<BBBxHHIH")
CALIBRATED, PCA = 1, 2
# The words are rANS (``rangecoding``, this build's coder); streams of builds that coded
# with constriction's ANS lack the flag and are refused by name.
RANS = 4
SECTIONS = ("exact", "delta", "mode", "buckets", "tables", "escapes", "low", "words")


def sections(parts: list[Any]) -> list[Any]:
    """The payload: the section index, then the sections (bytes-like buffers)."""
    return [struct.pack(f"<{len(parts)}Q", *(memoryview(p).nbytes for p in parts)), *parts]


def unsections(payload: memoryview) -> dict[str, memoryview]:
    n = len(SECTIONS)
    if len(payload) < 8 * n:
        raise ValueError(f"payload of {len(payload)} bytes has no room for its section index")
    lengths = struct.unpack_from(f"<{n}Q", payload)
    if 8 * n + sum(lengths) != len(payload):
        raise ValueError(f"sections add up to {8 * n + sum(lengths)} bytes, payload is {len(payload)}")
    out, pos = {}, 8 * n
    for name, ln in zip(SECTIONS, lengths):
        out[name] = payload[pos:pos + ln]
        pos += ln
    return out
