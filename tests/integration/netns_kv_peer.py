"""One side of a KV gRPC transfer, run inside a network namespace by test_netns_kv.py
(``ip netns exec NS python -m tests.integration.netns_kv_peer ...``).

- ``serve HOST TOKEN EXPIRE_S``: a real ``KVServer`` on HOST (an address of the namespace),
  token-checked; prints ``ready PORT``, then answers commands on stdin, one per line:
  ``publish RID MB`` (deterministic bytes, in 256 KiB parts), ``held`` (sweeps expired
  transfers first, as a worker's health() does, then prints how many the server holds),
  ``quit``.
- ``fetch ADDRESS RID DEADLINE_S TOKEN``: ``fetch_parts`` with that deadline (then, if
  complete, ``release``); prints ``frame N`` per frame received, then one JSON line: ok, bytes, sha256, error, seconds.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

from kvtransfer import grpc_transport as gt
from kvtransfer.base import KVTransferError


def payload(rid: str, mb: float) -> bytes:
    """Deterministic bytes for a request (both sides can compute the digest)."""
    n = int(mb * (1 << 20))
    block = hashlib.sha256(rid.encode()).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


def serve(host: str, token: str, expire_s: float) -> None:
    gt.EXPIRE_S = expire_s
    server = gt.KVServer(host=host, port=0, token=token, tls=None)
    print(f"ready {server.port}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "publish":
            rid, data = cmd[1], payload(cmd[1], float(cmd[2]))
            server.open(rid)
            part = 256 << 10
            for i in range(0, len(data), part):
                server.append(rid, data[i:i + part], last=i + part >= len(data))
            print("published", flush=True)
        elif cmd[0] == "held":
            server.sweep()
            print(f"held {server.held()}", flush=True)
        elif cmd[0] == "quit":
            break
    server.stop(0)


def fetch(address: str, rid: str, deadline_s: float, token: str) -> None:
    t0 = time.monotonic()
    h = hashlib.sha256()
    n = 0
    result: dict[str, object] = {"ok": False, "error": None}
    try:
        for i, part in enumerate(gt.fetch_parts(address, rid, deadline_s, token=token, cert=None)):
            h.update(part)
            n += len(part)
            print(f"frame {i}", flush=True)
        result["ok"] = True
        gt.release(address, rid, token=token)  # as the decode worker does once it has the KV
    except KVTransferError as e:
        result["error"] = str(e)
    result.update(bytes=n, sha256=h.hexdigest(), seconds=time.monotonic() - t0)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        fetch(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
