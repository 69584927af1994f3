"""In-process A/B of session 9's fused decode ops vs 91fbe47's formulas, interleaved by
blocks of steps in one process (same heap, same model). argv: batch, rounds."""
import sys, time, statistics, torch
import torch.nn.functional as F
import engine.model as M, engine.attention as A
from engine.rope import apply_rotary
from engine.engine import LLMEngine
from engine.sequence import SamplingParams
from models.builtin import builtin_model_dir
torch.set_num_threads(1)
B = int(sys.argv[1]); ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 6

new = {"rms": M.RMSNorm.forward, "attn": M.Attention.forward, "mlp": M.MLP.forward,
       "layer": M.DecoderLayer.forward, "lm": M.CausalLM.forward, "plan": A._decode_plan, "wkv": A.write_kv}

def rms_old(self, x):
    xf = x.float(); xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * xf.to(x.dtype)
def wkv_old(cache, k, v, slots):
    flat = cache.view(2, -1, cache.shape[3], cache.shape[4]); slots = slots.to(cache.device)
    flat[0].index_copy_(0, slots, k.to(cache.dtype)); flat[1].index_copy_(0, slots, v.to(cache.dtype))
def attn_old_rot(self, x, cos, sin, meta, cache):
    t, h, kvh, hd = x.shape[0], self.heads, self.kv_heads, self.head_dim
    qkv = self.qkv_proj(x)
    qk = apply_rotary(qkv[:, :(h + kvh) * hd].view(t, h + kvh, hd), cos, sin)
    q, k = qk[:, :h], qk[:, h:]
    v = qkv[:, (h + kvh) * hd:].view(t, kvh, hd)
    M.write_kv(cache, k, v, meta.slot_mapping)
    o = M.paged_attention(q, cache, meta, self.scale, self.sliding_window)
    return self.o_proj(o.reshape(t, self.heads * self.head_dim))
def lm_old_tables(self, input_ids, positions, meta, kv_caches, layer_hook=None):
    x = self.embed_tokens(input_ids)
    cos, sin = self.rotary.cos_sin(positions, x.dtype)
    for i, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
        x = layer(x, cos, sin, meta, cache)
    return self.norm(x)
def mlp_old(self, x, reduce=True):
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(F.silu(gate) * up, reduce=reduce)
def layer_old(self, x, cos, sin, meta, cache):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, cache)
    return x + self.mlp(self.post_attention_layernorm(x))
def plan_old(cache, tables, ctx, window):
    dev, bs = cache.device, cache.shape[2]
    nblk = max(-(-c // bs) for c in ctx)
    flat = []
    for t, c in zip(tables, ctx):
        used = -(-c // bs); flat.extend(t[:used]); flat.extend([0] * (nblk - used))
    lens = torch.tensor(ctx, device=dev)
    k_pos = torch.arange(nblk * bs, device=dev)[None, :]
    mask = (k_pos < lens[:, None]) & A._visible((lens - 1)[:, None], k_pos, window)
    return torch.tensor(flat, dtype=torch.long, device=dev), nblk, mask[:, None, None, :]

def setv(name):
    M.RMSNorm.forward = new["rms"]; M.Attention.forward = new["attn"]; M.MLP.forward = new["mlp"]
    M.DecoderLayer.forward = new["layer"]; M.CausalLM.forward = new["lm"]; A._decode_plan = new["plan"]
    M.write_kv = new["wkv"]
    parts = {"new": [], "old_all": ["rms", "rot", "wkv", "mlp", "layer", "plan"]}.get(name, [name])
    for p in parts:
        if p == "rms": M.RMSNorm.forward = rms_old
        if p == "rot": M.Attention.forward = attn_old_rot; M.CausalLM.forward = lm_old_tables
        if p == "wkv": M.write_kv = wkv_old
        if p == "mlp": M.MLP.forward = mlp_old
        if p == "layer": M.DecoderLayer.forward = layer_old
        if p == "plan": A._decode_plan = plan_old

eng = LLMEngine.from_model_dir(str(builtin_model_dir("smollm2-135m-instruct")), dtype="float32", num_blocks=1024, block_size=16)
variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["new", "old_all", "rot", "wkv", "rms", "layer", "mlp", "plan"]
for b in range(B):
    ids = [3 + (b * 7919 + i * 31) % 40000 for i in range(150)]
    eng.add_request(f"r{b}", ids, SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True))
while any(not s.output_token_ids for s in eng.scheduler.running) or eng.scheduler.waiting:
    eng.step()
res = {v: [] for v in variants}
K = 8
for r in range(ROUNDS):
    for v in (variants if r % 2 == 0 else variants[::-1]):
        setv(v); eng.step()
        ts = []
        for _ in range(K):
            t0 = time.perf_counter(); eng.step(); ts.append(time.perf_counter() - t0)
        res[v].append(statistics.median(ts) * 1e3)
base = statistics.median(res["new"])
for v in variants:
    m = statistics.median(res[v])
    print(f"batch {B} {v:8s} step p50 {m:6.2f} ms  new/this {base/m:.3f}  rounds {[round(x,1) for x in res[v]]}", flush=True)
