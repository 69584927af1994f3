import torch

from engine.runner import ModelRunner


def test_export_import_round_trip_any_length():
    caches = [torch.randn(2, 16, 4, 2, 8) for _ in range(3)]
    r = ModelRunner(torch.nn.Identity(), caches, 4)
    table = [7, 2, 11, 0]
    for n in (1, 4, 9, 16):
        kv = r.export_kv(table, n)
        # slot-by-slot reference
        for t in range(n):
            b, o = table[t // 4], t % 4
            assert torch.equal(kv[:, 0, t], torch.stack([c[0, b, o] for c in caches]))
            assert torch.equal(kv[:, 1, t], torch.stack([c[1, b, o] for c in caches]))
        dst = ModelRunner(torch.nn.Identity(), [torch.zeros(2, 16, 4, 2, 8) for _ in range(3)], 4)
        dst.import_kv([3, 5, 1, 9], kv)
        assert torch.equal(dst.export_kv([3, 5, 1, 9], n), kv)


def test_import_takes_this_ranks_heads():
    full = torch.randn(2, 2, 6, 4, 8)  # 4 kv heads in all
    r1 = ModelRunner(torch.nn.Identity(), [torch.zeros(2, 4, 4, 2, 8) for _ in range(2)], 4, tp_rank=1, tp_size=2)
    r1.import_kv([0, 1], full)
    assert torch.equal(r1.export_kv([0, 1], 6), full[:, :, :, 2:4])
