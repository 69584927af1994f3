"""The per-layer socket exchange (decode_workers/exchange.py) without Ray: greedy output
through real sockets equals the in-process exchange; two attention sides share the expert
servers (M:N); a dead server is an ExchangeError at once, a new address reconnects; a
server's error comes back as a message."""

from __future__ import annotations

import pytest
import torch

from decode_workers.exchange import ExchangeError, ExpertServer, SocketExchange
from engine.afd import ExpertRequest, ExpertShard, build_attention_runner, even_placement, local_afd_runner, shard_experts
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


def test_socket_exchange_equals_local_and_serves_two_attention_sides(model_dir):
    cfg = ModelConfig.from_dir(model_dir)
    pl = even_placement(cfg.num_hidden_layers, cfg.num_local_experts, 2)
    want = engine(local_afd_runner(model_dir, "float32", 64, 4, pl, 2), cfg).generate(PROMPTS, GREEDY)
    servers = servers_for(model_dir, pl)
    try:
        addrs = {s: tuple(sv.address) for s, sv in enumerate(servers)}
        a = engine(build_attention_runner(model_dir, "float32", 64, 4, SocketExchange(pl, addrs, 10), 2), cfg)
        b = engine(build_attention_runner(model_dir, "float32", 64, 4, SocketExchange(pl, addrs, 10), 1), cfg)
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
