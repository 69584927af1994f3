"""splitserve's KV connector for vLLM (``KVConnectorBase_V1``, vLLM 0.32), loaded out of
tree: ``KVTransferConfig(kv_connector="SplitServeConnector",
kv_connector_module_path="kvtransfer.vllm_connector", kv_role="kv_both", engine_id=...)``.

It moves no bytes between machines itself: the worker hosting vLLM does that through
kvtransfer (object store within a node, layer-wise gRPC stream with codecs across nodes).
This module is the part inside vLLM (see ``engine.vllm_channel``):

Scheduler side (inside vLLM's scheduler):
- ``get_num_new_matched_tokens``: a request marked ``load`` has its prompt KV waiting in
  the channel (fetched before the request was added): those tokens beyond vLLM's own
  prefix-cache hit are external, loaded synchronously (never computed, never half-loaded).
- ``update_state_after_alloc``: remembers the blocks vLLM allocated for them.
- ``build_connector_meta``: per step, the loads to write and, for requests marked
  ``save``, the prompt tokens whose KV this step computes (from 0 on the first step, so
  a prefix-cache hit is sent too).
- ``request_finished``: returns False: every save is a synchronous copy taken while the
  layer ran, so vLLM frees the blocks at once, on success, failure and abort alike.

Worker side (inside vLLM's model runner):
- ``register_kv_caches``: the paged caches, per layer.
- ``start_load_kv``: writes each load into its blocks before the forward pass; a load
  that fails is reported by ``get_block_ids_with_load_errors`` (vLLM then fails the
  request: ``kv_load_failure_policy`` ``fail``).
- ``save_kv_layer``: after a layer's attention wrote its KV, copies the step's tokens of
  each saving request out of the blocks and hands them to the channel.

Paged layout: vLLM's CPU attention (``CPU_ATTN``, layout ``LBHNC``) keeps a layer as
``[blocks, kv_heads, block_size, 2 * head_dim]``: per head, a key tile then a value tile
(vllm/v1/attention/backends/cpu_attn.py, ``kv_cache.view(B, H, 2 * N, -1).chunk(2,
dim=2)``), the key tile stored in an ISA-specific order. ``PagedLayout`` learns that order
from vLLM's own cache writer. Other backends (GPU) are not supported yet.
"""

from __future__ import annotations

import re
import time
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine.vllm_channel import Channel, lookup

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class Transfer:
    # Our request id (the worker's), tokens start..end, the request's block ids.
    request_id: str
    start: int
    end: int
    block_ids: list[int]


@dataclass
class SplitServeConnectorMetadata:
    """What the scheduler side tells the worker side for one step (a
    ``KVConnectorMetadata`` once vLLM is imported: see ``_classes``)."""

    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class _ReqState:
    request_id: str
    prompt_len: int
    save: bool
    block_ids: list[int] = field(default_factory=list)


def layer_index(layer_name: str) -> int:
    m = _LAYER.search(layer_name)
    if m is None:
        raise ValueError(f"cannot tell the layer index of attention layer {layer_name!r}")
    return int(m.group(1))


def _slots(t: Transfer, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(t.start, t.end)
    blocks = torch.tensor(t.block_ids, dtype=torch.long)[pos // block_size]
    return blocks, pos % block_size


class PagedLayout:
    """Where vLLM's CPU attention puts each key and value element inside a block.

    The block interior is ISA-specific (the key tile is stored transposed, and differently
    for fp32 and bf16), so rather than hard-code it, the layout is read off vLLM's own
    writer: ``cpu_attn_reshape_and_cache`` writes codes into a one-block scratch cache and
    the offset of each (token, head, dim) of K and V is looked up. Writes go through the
    same op, so loads are in vLLM's format by construction."""

    def __init__(self, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops, self.isa = ops, _get_attn_isa(dtype, block_size, head_dim)
        self.block_size, self.kv_heads, self.head_dim, self.dtype = block_size, kv_heads, head_dim, dtype
        n = block_size * kv_heads * head_dim
        idx = torch.arange(n).view(block_size, kv_heads, head_dim)
        # Codes small enough to be exact in bf16: the index in base 128, one digit per pass.
        offsets = []
        for half in (0, 1):  # 0: key, 1: value
            found = torch.zeros(2 * n, dtype=torch.long)
            written = torch.zeros(2 * n, dtype=torch.bool)
            for digit in (0, 1, 2):
                code = ((idx // 128 ** digit) % 128 + 1).to(dtype)
                zero = torch.zeros_like(code)
                cache = torch.zeros(1, kv_heads, block_size, 2 * head_dim, dtype=dtype)
                self._write(cache, code if half == 0 else zero, zero if half == 0 else code,
                            torch.arange(block_size))
                flat = cache.view(-1).to(torch.long)
                written = flat > 0
                found += torch.where(written, (flat - 1) * 128 ** digit, 0)
            # found[p]: the element stored at offset p; invert it.
            pos = torch.full((n,), -1, dtype=torch.long)
            pos[found[written]] = torch.nonzero(written).flatten()
            if (pos < 0).any() or int(written.sum()) != n:
                raise RuntimeError(f"could not map vLLM's CPU KV layout (isa {self.isa}, {dtype}, "
                                   f"block {block_size}, heads {kv_heads}, head_dim {head_dim})")
            offsets.append(pos.view(block_size, kv_heads, head_dim))
        self.key_pos, self.value_pos = offsets
        self.block_numel = 2 * n

    def _write(self, cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        b, h, n, _ = cache.shape
        kc, vc = cache.view(b, h, 2 * n, -1).chunk(2, dim=2)
        self.ops.cpu_attn_reshape_and_cache(key.contiguous(), value.contiguous(), kc, vc, slots, self.isa)

    def read(self, kv_layer: torch.Tensor, t: Transfer) -> torch.Tensor:
        """KV of tokens t.start..t.end: [2, n, kv_heads, head_dim] (a copy)."""
        if not kv_layer.is_contiguous() or kv_layer[0].numel() != self.block_numel:
            raise NotImplementedError(f"unexpected paged KV layer {tuple(kv_layer.shape)} "
                                      f"(contiguous={kv_layer.is_contiguous()})")
        blocks, offs = _slots(t, self.block_size)
        base = (blocks * self.block_numel).view(-1, 1, 1)
        flat = kv_layer.view(-1)
        return torch.stack([flat[base + self.key_pos[offs]], flat[base + self.value_pos[offs]]])

    def write(self, kv_layer: torch.Tensor, t: Transfer, kv: torch.Tensor) -> None:
        """Write kv [2, n, kv_heads, head_dim] as tokens t.start..t.end (vLLM's own writer)."""
        blocks, offs = _slots(t, self.block_size)
        kv = kv.to(kv_layer.dtype)
        self._write(kv_layer, kv[0], kv[1], blocks * self.block_size + offs)


class _SplitServeConnector:
    """The connector's methods; ``SplitServeConnector`` (built on first access, see
    ``__getattr__``) adds vLLM's ``KVConnectorBase_V1``."""

    def __init__(self, vllm_config: "VllmConfig", role: "KVConnectorRole",
                 kv_cache_config: "KVCacheConfig | None" = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)  # type: ignore[call-arg]
        self.channel: Channel = lookup(self._kv_transfer_config.engine_id)  # type: ignore[attr-defined]
        self.block_size = vllm_config.cache_config.block_size
        self.head_dim = self.channel.head_dim
        # Scheduler side.
        self._reqs: dict[str, _ReqState] = {}  # vLLM's request id -> state
        self._local: dict[str, int] = {}  # vLLM's request id -> tokens vLLM had cached itself
        self._loads: dict[str, Transfer] = {}  # allocated, to load in the next step
        # Worker side.
        self._caches: dict[str, torch.Tensor] = {}
        self._failed_blocks: set[int] = set()
        self._layout: PagedLayout | None = None

    @property
    def layout(self) -> PagedLayout:
        if self._layout is None:
            ch = self.channel
            self._layout = PagedLayout(self.block_size, ch.kv_heads, ch.head_dim, ch.dtype)
        return self._layout

    # ==== scheduler side ===============================================================
    @staticmethod
    def _params(request: "Request") -> dict[str, Any]:
        p = request.kv_transfer_params
        return p if isinstance(p, dict) and "splitserve_id" in p else {}

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        p = self._params(request)
        if not p.get("load"):
            return 0, False
        kv = self.channel.loads.get(p["splitserve_id"])
        if kv is None:
            return 0, False
        self._local[request.request_id] = num_computed_tokens
        return max(0, int(kv.shape[2]) - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        p = self._params(request)
        start = self._local.pop(request.request_id, 0)
        self._loads[request.request_id] = Transfer(p["splitserve_id"], start, start + num_external_tokens,
                                                   list(blocks.get_block_ids()[0]))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> Any:
        meta = _classes()[1]()
        now = time.monotonic()
        for new in scheduler_output.scheduled_new_reqs:
            p = new.sampling_params.extra_args.get("kv_transfer_params") if (
                new.sampling_params is not None and new.sampling_params.extra_args) else None
            rid = p.get("splitserve_id") if isinstance(p, dict) else None
            if rid is None:
                continue
            self.channel.first_scheduled.setdefault(rid, now)
            st = self._reqs[new.req_id] = _ReqState(rid, len(new.prompt_token_ids or ()), bool(p.get("save")),
                                                    list(new.block_ids[0]))
            load = self._loads.pop(new.req_id, None)
            if load is not None:
                meta.loads.append(load)
            end = min(new.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(new.req_id, 0),
                      st.prompt_len)
            if st.save and end > 0:
                meta.saves.append(Transfer(rid, 0, end, st.block_ids))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_blocks[0]) if new_blocks is not None else []
            elif new_blocks is not None:
                st.block_ids.extend(new_blocks[0])
            load = self._loads.pop(req_id, None)
            if load is not None:
                load.block_ids = list(st.block_ids)
                meta.loads.append(load)
            start = cached.num_computed_tokens[i]
            if req_id in cached.resumed_req_ids:
                start = 0  # recomputed after a preemption: the sender skips what it has
            end = min(cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(req_id, 0),
                      st.prompt_len)
            if st.save and end > start:
                meta.saves.append(Transfer(st.request_id, start, end, list(st.block_ids)))
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._local.pop(request.request_id, None)
        self._loads.pop(request.request_id, None)
        return False, None

    # ==== worker side ==================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._caches = dict(kv_caches)

    def _layers(self, forward_context: "ForwardContext") -> dict[str, torch.Tensor]:
        if self._caches:
            return self._caches
        out = {}
        for name, layer in forward_context.no_compile_layers.items():
            kv = getattr(layer, "kv_cache", None)
            if isinstance(kv, torch.Tensor):
                out[name] = kv
        return out

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()  # type: ignore[attr-defined]
        assert isinstance(meta, SplitServeConnectorMetadata)
        if not meta.loads:
            return
        layers = self._layers(forward_context)
        for t in meta.loads:
            kv = self.channel.loads.pop(t.request_id, None)
            try:
                if kv is None:
                    raise RuntimeError("its KV is gone (aborted?)")
                if kv.shape[2] < t.end or kv.shape[0] != self.channel.num_layers:
                    raise RuntimeError(f"KV of shape {tuple(kv.shape)} cannot fill tokens {t.start}..{t.end}")
                for name, cache in layers.items():
                    self.layout.write(cache, t, kv[layer_index(name), :, t.start:t.end])
                self.channel.loaded += 1
            except Exception as e:  # noqa: BLE001 - vLLM fails the request (kv_load_failure_policy)
                self.channel.load_errors[t.request_id] = f"{type(e).__name__}: {e}"
                first, last = t.start // self.block_size, -(-t.end // self.block_size)
                self._failed_blocks.update(t.block_ids[first:last])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are written before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()  # type: ignore[attr-defined]
        assert isinstance(meta, SplitServeConnectorMetadata)
        if not meta.saves:
            return
        layer = layer_index(layer_name)
        for t in meta.saves:
            self.channel.saved(t.request_id, layer, t.start, self.layout.read(kv_layer, t))

    def wait_for_save(self) -> None:
        return  # saves are synchronous copies

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._failed_blocks = self._failed_blocks, set()
        return out


_BUILT: tuple[type, type] | None = None


def _classes() -> tuple[type, type]:
    """(SplitServeConnector, its metadata class) on vLLM's base classes; vLLM is imported
    here, on first use, so that importing this module needs no vLLM."""
    global _BUILT
    if _BUILT is None:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorMetadata

        def body(ns: dict[str, Any]) -> None:
            ns["__module__"] = __name__

        meta = dataclass(types.new_class("SplitServeConnectorMetadataV1",
                                         (SplitServeConnectorMetadata, KVConnectorMetadata), exec_body=body))
        conn = types.new_class("SplitServeConnector", (_SplitServeConnector, KVConnectorBase_V1), exec_body=body)
        _BUILT = (conn, meta)
    return _BUILT


def __getattr__(name: str) -> Any:
    # vLLM's factory looks the class up by name (getattr(module, kv_connector)).
    if name == "SplitServeConnector":
        return _classes()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
