"""Bad manifests at scale (hypothesis): deploy/manifests/demo-ha.yaml with a value replaced
by arbitrary JSON, a key removed or an unknown key added, at any depth. Each result is a
valid Manifest or a ManifestError whose every line is `field.path: reason`; never another
exception."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (the test extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from cluster.errors import ManifestError  # noqa: E402
from cluster.manifest import parse_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "deploy/manifests/demo-ha.yaml").read_text())
# A field path (names, [i], JSON-quoted odd keys, or <root>), then ": reason".
LINE = re.compile(r'^(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_<>\[\].\-])+: \S')


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, prefix + (i,))
    return out


PATHS = paths(BASE)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@st.composite
def mutated(draw) -> dict:
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = data
        try:
            for k in path[:-1]:
                parent = parent[k]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced an ancestor
        if not isinstance(parent, (dict, list)):
            continue
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        key = path[-1]
        if action == "replace" and (isinstance(parent, list) and key < len(parent) or
                                    isinstance(parent, dict) and key in parent):
            parent[key] = draw(json_values)
        elif action == "remove" and isinstance(parent, dict):
            parent.pop(key, None)
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    return data


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=mutated())
def test_mutated_manifests_give_field_path_reason(data):
    try:
        parse_manifest(data, base_dir=str(ROOT / "deploy/manifests"))
    except ManifestError as e:
        lines = e.lines()
        assert lines, data
        for line in lines:
            assert LINE.match(line) and "Traceback" not in line, (line, data)


def test_the_fuzzer_reaches_errors():
    """The strategy is not vacuous: a replaced pool field is refused with its path."""
    data = copy.deepcopy(BASE)
    data["pools"]["decode"]["num_kv_blocks"] = "many"
    with pytest.raises(ManifestError) as err:
        parse_manifest(data, base_dir=str(ROOT / "deploy/manifests"))
    assert err.value.lines()[0].startswith("pools.decode.num_kv_blocks: ")
