"""`place-experts --from URL`: the live expert load read from a server's /metrics text
(cluster/expert_stats.py) and fed to the placement (placement/experts.py), no server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.expert_stats import ExpertStatsError, parse_expert_loads
from placement.experts import TraceStats, place_experts

TEXT = """# HELP splitserve_expert_routed_tokens Token choices
# TYPE splitserve_expert_routed_tokens gauge
splitserve_expert_routed_tokens{expert="0",layer="0",pool="attention",worker="attention-0"} 30.0
splitserve_expert_routed_tokens{expert="1",layer="0",pool="attention",worker="attention-0"} 2.0
splitserve_expert_routed_tokens{expert="0",layer="0",pool="attention",worker="attention-1"} 10.0
splitserve_expert_routed_tokens{expert="3",layer="1",pool="attention",worker="attention-0"} 5.0
splitserve_expert_rows{expert="0",layer="0",pool="expert",worker="expert-0"} 99.0
# HELP splitserve_pool_replicas Live workers per pool
# TYPE splitserve_pool_replicas gauge
splitserve_pool_replicas{pool="attention"} 2.0
splitserve_pool_replicas{pool="expert"} 3.0
"""


def test_loads_summed_over_attention_workers() -> None:
    loads, replicas = parse_expert_loads(TEXT)
    assert replicas == 3
    assert loads.tolist() == [[40, 2, 0, 0], [0, 0, 0, 5]]  # expert rows are not routed choices


def test_no_expert_statistics_is_a_clear_error() -> None:
    with pytest.raises(ExpertStatsError, match="not an attention/expert deployment"):
        parse_expert_loads('splitserve_pool_replicas{pool="decode"} 1.0\n')
    with pytest.raises(ExpertStatsError, match="no tokens yet"):
        parse_expert_loads('splitserve_expert_routed_tokens{expert="0",layer="0",pool="a",worker="w"} 0.0\n')


def test_placement_from_loads_balances_the_hot_expert(tmp_path) -> None:
    loads = np.array([[400, 10, 10, 10, 10, 10, 10, 10]] * 2)
    stats = TraceStats.from_loads(loads, top_k=2)
    p = place_experts(stats, gpus=2, gpus_per_node=2, slots=5, method="ilp", time_limit_s=20)
    for layer in p.layers:
        assert sorted({e for ids in layer for e in ids}) == list(range(8))
        assert all(0 in ids for ids in layer)  # the hot expert replicated on both workers
    json.dumps(p.to_json())


def test_cli_from_url_without_a_server_exits_2(capsys) -> None:
    from cluster.cli import main

    assert main(["place-experts", "--from", "http://127.0.0.1:9", "--gpus-per-node", "1", "--slots", "4",
                 "--out", "/dev/null"]) == 2
    assert "--from http://127.0.0.1:9" in capsys.readouterr().err
    assert main(["place-experts", "--gpus", "2", "--gpus-per-node", "1", "--slots", "4", "--out", "/dev/null"]) == 2
    assert "exactly one of --trace" in capsys.readouterr().err
