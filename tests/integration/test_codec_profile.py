"""An adaptive prefill worker measures its KV codecs on its own model at start-up; when it
cannot, it still serves with the built-in constants and says so (health and a metric),
instead of falling back silently. Real prefill worker actors on the session's Ray."""

from __future__ import annotations

import ray

from cluster.metrics import Metrics
from kvtransfer.policy import DEFAULT_PROFILE
from prefill_workers.worker import PrefillWorker
from tests.integration.conftest import manifest_for


class ProfileFailsWorker(PrefillWorker):
    """A prefill worker whose start-up measurement fails (as it would on a model whose
    probe prefill errors out)."""

    async def _profile_codecs(self, tokens: int = 512) -> None:
        raise RuntimeError("probe prefill failed")


def _start(cls, worker_id, manifest):
    actor = ray.remote(cls).options(num_cpus=1, max_concurrency=100).remote(
        worker_id, manifest.model_dump_json(), "prefill")
    return actor, ray.get(actor.start.remote(), timeout=300)


def _gauge(metrics: Metrics, worker_id: str) -> float | None:
    return metrics.registry.get_sample_value("splitserve_worker_kv_codec_profile_measured",
                                             {"worker": worker_id, "pool": "prefill"})


def test_adaptive_worker_measures_its_codecs_and_says_so(ray_session, llama_dir):
    manifest = manifest_for(llama_dir, kv_transfer={"codec": "adaptive", "level": 1,
                                                              "max_quality_loss": 0.05})
    actor, health = _start(PrefillWorker, "prefill-profile-ok", manifest)
    try:
        assert health["kv_codec_profile"] == "measured" and health["kv_codec_profile_error"] is None, health
        policy = ray.get(actor.kv_policy.remote(), timeout=30)
        labels = [o["label"] for o in policy["options"]]
        assert sorted(labels) == sorted(["none", "lossless", "int8", "cachegen:0", "cachegen:1"])
        for o in policy["options"]:
            # Measured on this model's KV, not the built-in constants.
            assert (o["size_ratio"], o["encode_bps"], o["decode_bps"]) != DEFAULT_PROFILE[o["label"]], o
        none = next(o for o in policy["options"] if o["label"] == "none")
        assert none["size_ratio"] > 1.0  # raw bytes plus each piece's stream header: a measurement
        metrics = Metrics()
        metrics.update_workers({"prefill": [{"worker_id": "prefill-profile-ok", "stats": health}]})
        assert _gauge(metrics, "prefill-profile-ok") == 1
    finally:
        ray.kill(actor)


def test_a_failed_profile_is_reported_not_silent(ray_session, llama_dir):
    manifest = manifest_for(llama_dir, kv_transfer={"codec": "adaptive", "level": 1,
                                                              "max_quality_loss": 0.05})
    actor, health = _start(ProfileFailsWorker, "prefill-profile-fails", manifest)
    try:
        assert health["ready"] is True  # it still serves
        assert health["kv_codec_profile"] == "default", health
        assert "probe prefill failed" in health["kv_codec_profile_error"]
        policy = ray.get(actor.kv_policy.remote(), timeout=30)
        for o in policy["options"]:
            assert (o["size_ratio"], o["encode_bps"], o["decode_bps"]) == DEFAULT_PROFILE[o["label"]], o
        metrics = Metrics()
        metrics.update_workers({"prefill": [{"worker_id": "prefill-profile-fails", "stats": health}]})
        assert _gauge(metrics, "prefill-profile-fails") == 0
        # The gauge goes with the worker.
        metrics.update_workers({"prefill": []})
        assert _gauge(metrics, "prefill-profile-fails") is None
    finally:
        ray.kill(actor)


def test_pinned_codec_has_no_profile_and_no_gauge(ray_session, llama_dir):
    manifest = manifest_for(llama_dir, kv_transfer={"codec": "int8"})
    actor, health = _start(PrefillWorker, "prefill-pinned", manifest)
    try:
        assert health["kv_codec_profile"] is None
        metrics = Metrics()
        metrics.update_workers({"prefill": [{"worker_id": "prefill-pinned", "stats": health}]})
        assert _gauge(metrics, "prefill-pinned") is None
    finally:
        ray.kill(actor)
