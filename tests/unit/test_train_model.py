"""The training forward is the engine's math (so a trained model serves as trained), and
a short training run lowers the held-out loss."""

import torch

from models.make import TrainSettings, make_model, train_weights
from models.train import dense_forward
from engine.attention_metadata import AttentionMetadata
from engine.config import ModelConfig
from engine.loader import load_model
from engine.model import allocate_kv_cache
from engine.rope import Rotary
from safetensors.torch import load_file


def test_dense_forward_equals_paged_engine(tmp_path):
    for arch in ("llama", "mixtral"):
        d = make_model(arch, tmp_path / arch)
        cfg = ModelConfig.from_dir(d)
        ids = torch.randint(3, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
        sd = load_file(str(d / "model.safetensors"))
        dense = dense_forward(sd, cfg, ids, Rotary(cfg))[0]
        model = load_model(d)
        caches = allocate_kv_cache(cfg, 8, 4, torch.float32)
        meta = AttentionMetadata([20], [20], [[3, 1, 7, 0, 5]], torch.tensor(
            [[3, 1, 7, 0, 5][i // 4] * 4 + i % 4 for i in range(20)]), 4)
        paged = model.compute_logits(model(ids[0], torch.arange(20), meta, caches))
        assert torch.allclose(dense, paged, atol=1e-4), (arch, (dense - paged).abs().max())


def test_short_training_lowers_heldout_loss(tmp_path):
    """A fixed number of steps (the path `make-model --train` takes), so the run and its
    result are the same however loaded the machine is; two runs agree exactly."""
    settings = TrainSettings(steps=30, batch=4, seq=64, warmup_steps=5, log_every=10)
    logs = []
    for run in ("a", "b"):
        d = make_model("llama", tmp_path / run)
        logs.append(train_weights(d, settings, seed=0))
    log = logs[0]
    assert log["steps"] == 30 and log["heldout_loss_after"] < log["heldout_loss_before"]
    assert logs[0]["heldout_loss_after"] == logs[1]["heldout_loss_after"]
