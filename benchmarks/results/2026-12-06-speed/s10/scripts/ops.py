"""Per-layer micro A/B of session 9's fused ops vs the old formulas (decode, SmolLM2 shapes)."""
import time, statistics, torch, sys
import torch.nn.functional as F
torch.set_num_threads(1)
from engine.rope import rotate_half
B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
h, kvh, hd, hid, inter = 9, 3, 64, 576, 1536
cache = torch.zeros(2, 512, 16, kvh, hd)
slots = torch.arange(200, 200 + B) * 3 % 8000
qkv = torch.randn(B, (h + 2 * kvh) * hd)
cos = torch.randn(B, hd); sin = torch.randn(B, hd)
half = hd // 2
ssin = torch.cat([-sin[:, :half], sin[:, half:]], -1)[:, None, :]; cos3 = cos[:, None, :]
x = torch.randn(B, hid); w = torch.ones(hid); gu = torch.randn(B, 2 * inter)

def wkv_new():
    k = qkv[:, h*hd:(h+kvh)*hd].view(B, kvh, hd); v = qkv[:, (h+kvh)*hd:].view(B, kvh, hd)
    flat = cache.view(2, -1, kvh, hd)
    flat.index_copy_(1, slots, torch.stack((k, v)))
def wkv_old():
    k = qkv[:, h*hd:(h+kvh)*hd].view(B, kvh, hd); v = qkv[:, (h+kvh)*hd:].view(B, kvh, hd)
    flat = cache.view(2, -1, kvh, hd)
    flat[0].index_copy_(0, slots, k); flat[1].index_copy_(0, slots, v)
def rot_new():
    xx = qkv[:, :(h + kvh) * hd].view(B, h + kvh, hd)
    r = xx.roll(half, -1); r.mul_(ssin); out = xx * cos3; return out.add_(r)
def rot_old():
    xx = qkv[:, :(h + kvh) * hd].view(B, h + kvh, hd)
    return xx * cos[:, None, :] + rotate_half(xx) * sin[:, None, :]
def rot_slices():  # signed sin, halves by cat of slices
    xx = qkv[:, :(h + kvh) * hd].view(B, h + kvh, hd)
    r = torch.cat((xx[..., half:], xx[..., :half]), -1); r.mul_(ssin); out = xx * cos3; return out.add_(r)
def rms_new():
    r = x.pow(2).mean(-1, keepdim=True).add_(1e-5).rsqrt_(); return (x * r).mul_(w)
def rms_old():
    xf = x.float(); xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5); return w * xf.to(x.dtype)
def swi_new():
    g, u = gu.chunk(2, -1); return F.silu(g).mul_(u)
def swi_old():
    g, u = gu.chunk(2, -1); return F.silu(g) * u
pairs = [("write_kv", wkv_old, wkv_new), ("rotary", rot_old, rot_new), ("rotary_slices_vs_roll", rot_slices, rot_new),
         ("rmsnorm", rms_old, rms_new), ("swiglu", swi_old, swi_new)]
N = 2000
with torch.inference_mode():
    for name, a, b in pairs:
        ta, tb = [], []
        for rnd in range(7):
            for f, acc in ((a, ta), (b, tb)):
                for _ in range(100): f()
                t0 = time.perf_counter()
                for _ in range(N): f()
                acc.append((time.perf_counter() - t0) / N * 1e6)
        ma, mb = statistics.median(ta), statistics.median(tb)
        print(f"B={B} {name}: old {ma:.2f} us  new {mb:.2f} us  (x30 layers: {30*(mb-ma)/1000:+.3f} ms/step)", flush=True)
