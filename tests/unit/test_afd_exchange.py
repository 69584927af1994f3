"""The per-layer socket exchange (decode_workers/exchange.py) without Ray: greedy output
through real sockets equals the in-process exchange; two attention sides share the expert
servers (M:N); a dead server is an ExchangeError at once, a new address reconnects; a
server's error comes back as a message."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from decode_workers.exchange import ExchangeError, ExpertServer, SocketExchange
from engine.afd import build_attention_runner, local_afd_runner
from engine.experts import ExpertRequest, ExpertShard, even_placement, shard_experts
from engine.config import ModelConfig
from engine.engine import LLMEngine
from engine.scheduler import SchedulerConfig
from engine.sequence import SamplingParams
from models.builtin import builtin_model_dir

GREEDY = SamplingParams(temperature=0, max_tokens=6)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20], [30, 31]]


@pytest.fixture(scope="module")
def model_dir():
    return str(builtin_model_dir("tiny-mixtral"))


def engine(runner, cfg):
    return LLMEngine(runner, SchedulerConfig(max_num_batched_tokens=16, max_model_len=4096), 64,
                     eos_token_ids=cfg.eos_token_ids)


def servers_for(model_dir, placement):
    return [ExpertServer(ExpertShard.load_from(model_dir, torch.float32, shard_experts(placement, s)))
            for s in range(len(placement[0]))]


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "socket-only"])
def test_socket_exchange_equals_local_and_serves_two_attention_sides(model_dir, shm):
    cfg = ModelConfig.from_dir(model_dir)
    pl = even_placement(cfg.num_hidden_layers, cfg.num_local_experts, 2)
    want = engine(local_afd_runner(model_dir, "float32", 64, 4, pl, 2), cfg).generate(PROMPTS, GREEDY)
    servers = servers_for(model_dir, pl)
    try:
        addrs = {s: tuple(sv.address) for s, sv in enumerate(servers)}
        # b's regions are too small for some payloads: those go inline beside the shared ones.
        ea, eb = SocketExchange(pl, addrs, 10, shm=shm), SocketExchange(pl, addrs, 10, shm=shm, slots=1,
                                                                         slot_bytes=4 * cfg.hidden_size * 4)
        a = engine(build_attention_runner(model_dir, "float32", 64, 4, ea, 2), cfg)
        b = engine(build_attention_runner(model_dir, "float32", 64, 4, eb, 1), cfg)
        for i, p in enumerate(PROMPTS):
            a.add_request(f"a{i}", p, GREEDY)
            b.add_request(f"b{i}", p[::-1], GREEDY)
        seqs_a = list(a._seqs.values())
        while a.has_work or b.has_work:  # interleaved steps: both sides hit the servers
            if a.has_work:
                a.step()
            if b.has_work:
                b.step()
        assert [s.output_token_ids for s in seqs_a] == want
        assert all(sv.connections == 2 and sv.requests > 0 for sv in servers)
        # Same node: payloads through shared memory unless turned off; nothing left in /dev/shm.
        assert all(sv.shm_connections == (2 if shm else 0) for sv in servers)
        assert (ea.shm_messages > 0) == shm and (0 < eb.shm_messages < eb.round_trips) == shm
        assert ea.uses_shm(0) == shm and not [f for f in os.listdir("/dev/shm") if f"afd-{os.getpid()}-" in f]
    finally:
        for sv in servers:
            sv.stop()


def test_dead_server_fails_fast_and_new_address_reconnects(model_dir):
    cfg = ModelConfig.from_dir(model_dir)
    pl = even_placement(cfg.num_hidden_layers, cfg.num_local_experts, 2)
    servers = servers_for(model_dir, pl)
    ex = SocketExchange(pl, {s: tuple(sv.address) for s, sv in enumerate(servers)}, timeout_s=10)
    x = torch.randn(3, cfg.hidden_size)
    ex.send(0, 1, ExpertRequest(0, x, [(0, 2), (1, 1)]))
    assert ex.recv(0, 1).shape == (3, cfg.hidden_size)
    # A request for an expert the shard lacks: the server's error comes back as a message.
    ex.send(0, 2, ExpertRequest(0, x, [(7, 3)]))
    with pytest.raises(ExchangeError, match="expert 7 is not held here"):
        ex.recv(0, 2)
    servers[0].stop()
    with pytest.raises(ExchangeError, match="expert shard 0"):
        ex.send(0, 3, ExpertRequest(0, x, [(0, 3)]))
        ex.recv(0, 3)
    replacement = ExpertServer(ExpertShard.load_from(model_dir, torch.float32, shard_experts(pl, 0)))
    try:
        ex.set_addresses({0: tuple(replacement.address), 1: tuple(servers[1].address)})
        ex.send(0, 4, ExpertRequest(0, x, [(0, 3)]))
        assert ex.recv(0, 4).shape == (3, cfg.hidden_size)
        with pytest.raises(ExchangeError, match="no expert worker for shard 1"):
            ex.set_addresses({0: tuple(replacement.address)})
            ex.close()
            ex.send(1, 5, ExpertRequest(0, x, [(4, 3)]))
    finally:
        replacement.stop()
        servers[1].stop()
        ex.close()


def test_failed_step_leaves_no_stale_replies(model_dir):
    """A step that fails on one dead shard (the other shard's reply still in flight) is
    followed by steps whose outputs are right once the shard is back."""
    cfg = ModelConfig.from_dir(model_dir)
    pl = even_placement(cfg.num_hidden_layers, cfg.num_local_experts, 2)
    want = engine(local_afd_runner(model_dir, "float32", 64, 4, pl, 2), cfg).generate(PROMPTS, GREEDY)
    servers = servers_for(model_dir, pl)
    ex = SocketExchange(pl, {s: tuple(sv.address) for s, sv in enumerate(servers)}, timeout_s=10)
    runner = build_attention_runner(model_dir, "float32", 64, 4, ex, 2)
    first = engine(runner, cfg)
    for i, p in enumerate(PROMPTS):
        first.add_request(f"r{i}", p, GREEDY)
    first.step()
    servers[0].stop()
    with pytest.raises(ExchangeError):
        first.step()
    back = ExpertServer(ExpertShard.load_from(model_dir, torch.float32, shard_experts(pl, 0)))
    try:
        ex.set_addresses({0: tuple(back.address), 1: tuple(servers[1].address)})
        assert engine(runner, cfg).generate(PROMPTS, GREEDY) == want
    finally:
        back.stop()
        servers[1].stop()
        ex.close()


SLOW_SERVER = """
import sys, time, torch
from decode_workers.exchange import ExpertServer
class Slow:
    def run(self, req):
        time.sleep(60)
        return req.x
server = ExpertServer(Slow())
print(server.address[1], flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("shm", [True, False], ids=["shared-memory", "socket-only"])
def test_killed_server_is_seen_at_once_while_waiting(shm):
    """SIGKILL of the expert process while the attention side waits for its reply: an
    ExchangeError from the reset connection (not the 60 s timeout); nothing hangs."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        port = int(proc.stdout.readline())
        ex = SocketExchange([[[0]]], {0: ("127.0.0.1", port)}, timeout_s=60, shm=shm)
        ex.send(0, 1, ExpertRequest(0, torch.randn(4, 8), [(0, 4)]))
        assert ex.uses_shm(0) == shm
        time.sleep(0.3)
        proc.kill()
        with pytest.raises(ExchangeError, match="expert shard 0") as e:
            ex.recv(0, 1)
        # The closed connection ended the wait, not the 60 s timeout.
        assert "closed by peer" in str(e.value) or "reset" in str(e.value).lower(), e.value
        assert "timed out" not in str(e.value) and "within" not in str(e.value)
        assert not ex.uses_shm(0)
    finally:
        proc.kill()
        proc.wait(10)


def test_no_shared_memory_means_socket_only(model_dir, monkeypatch, tmp_path):
    """A segment that cannot be created (here: no such directory; in a container, a full
    /dev/shm) leaves that connection on the socket alone, with the same outputs."""
    import decode_workers.exchange as exchange

    monkeypatch.setattr(exchange, "SHM_DIR", str(tmp_path / "missing"))
    cfg = ModelConfig.from_dir(model_dir)
    pl = even_placement(cfg.num_hidden_layers, cfg.num_local_experts, 2)
    server = ExpertServer(ExpertShard.load_from(model_dir, torch.float32, shard_experts(pl, 0)))
    try:
        ex = SocketExchange(pl, {0: tuple(server.address)}, timeout_s=10, shm=True)
        x = torch.randn(3, cfg.hidden_size)
        ex.send(0, 1, ExpertRequest(0, x, [(0, 2), (1, 1)]))
        y = ex.recv(0, 1)
        want = server.shard.run(ExpertRequest(0, x, [(0, 2), (1, 1)]))
        assert torch.equal(y, want) and not ex.uses_shm(0) and server.shm_connections == 0
        ex.close()
    finally:
        server.stop()
