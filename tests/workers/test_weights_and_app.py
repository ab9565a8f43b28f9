"""Weights from files and the object-store registry; the Celery app's delivery settings."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import torch
from click.testing import CliRunner
from tests_support import png_bytes

from common.settings import Settings, get_settings, reset_settings
from orchestrator.cli import cli
from orchestrator.context import open_orchestrator
from storage import repo
from workers import runtime
from workers.app import make_app
from workers.weights import WeightsNotFound, load_clip, to_safetensors


def test_file_weights_load_and_mismatch_is_refused(tmp_path):
    ref = load_clip("inspect-tiny", "random").model.state_dict()
    pt = tmp_path / "w.pt"
    torch.save(ref, pt)
    st = tmp_path / "w.safetensors"
    st.write_bytes(to_safetensors(ref))
    for path in (pt, st):
        clip = load_clip("inspect-tiny", str(path))
        assert not clip.random_weights and clip.weights_ref == str(path)
        assert torch.equal(clip.model.state_dict()["visual.proj"], ref["visual.proj"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(to_safetensors({"visual.proj": torch.zeros(2, 2)}))
    with pytest.raises(WeightsNotFound, match="do not fit"):
        load_clip("inspect-tiny", str(bad))


def test_pretrained_tag_without_network_fails_with_guidance(monkeypatch):
    import open_clip

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(WeightsNotFound, match="inspect models import"):
        load_clip("ViT-B-16-plus-240", "laion400m_e31")


@pytest.mark.integration
def test_imported_weights_go_through_object_store(
    tmp_path, pg_module_url, s3_server, s3_credentials, monkeypatch
):
    env = {
        "INSPECT_DATABASE_URL": pg_module_url, "INSPECT_S3_ENDPOINT": s3_server,
        "INSPECT_S3_ACCESS_KEY": s3_credentials["access_key"],
        "INSPECT_S3_SECRET_KEY": s3_credentials["secret_key"],
        "INSPECT_S3_BUCKET": f"w-{uuid.uuid4().hex[:10]}", "INSPECT_S3_REGION": "us-east-1",
        "INSPECT_CLIP_MODEL": "inspect-tiny",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_settings()
    with torch.random.fork_rng():
        torch.manual_seed(123)
        from workers.weights import build_model

        state = build_model("inspect-tiny").state_dict()
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": state}, ckpt)
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    out = CliRunner().invoke(cli, ["models", "import", str(ckpt), "--name", name, "--tag", "test"])
    assert out.exit_code == 0, out.output
    assert "sha256=" in out.output

    monkeypatch.setenv("INSPECT_WEIGHTS", name)
    reset_settings()
    runtime.reset_engine()
    orch = open_orchestrator(get_settings())
    sub = orch.intake.submit(png_bytes(1), line="1", category=f"c{uuid.uuid4().hex[:6]}")
    with orch.sessions() as s:
        insp = repo.get_inspection(s, sub.inspection_id)
        assert insp.status.value == "done", insp.reason
        assert insp.result.weights_ref.startswith(f"{name}@") and not insp.result.random_weights
        w = repo.get_weights(s, name)
        assert w.arch == "inspect-tiny" and orch.store.exists(w.object_key)
    runtime.reset_engine()


def test_celery_app_is_json_only_late_ack_prefetch_one():
    app = make_app(Settings(broker_url="amqp://x", queue_routes="segment=gpu.segment"))
    c = app.conf
    assert c.task_serializer == "json" and list(c.accept_content) == ["json"]
    assert c.task_acks_late and c.task_reject_on_worker_lost and c.worker_prefetch_multiplier == 1
    assert c.task_routes["inspect.segment"]["queue"] == "gpu.segment"
    assert c.task_routes["inspect.finalize"]["queue"] == "gpu"
    keys = [(q.name, q.routing_key) for q in c.task_queues]
    assert keys == [("gpu", "gpu"), ("gpu.segment", "gpu.segment")]  # one binding per queue
    base = {"x-queue-type": "quorum", "x-dead-letter-exchange": "inspect.dlx", "x-delivery-limit": 5}
    gpu, segment = c.task_queues  # quorum, explicit dead-letter exchange and delivery limit (RabbitMQ 3.10)
    assert gpu.durable and gpu.queue_arguments == base | {"x-consumer-timeout": 4 * 3600 * 1000}  # hosts banks
    assert segment.durable and segment.queue_arguments == base  # frames only: the broker default applies


def test_bad_route_setting_is_refused():
    with pytest.raises(ValueError, match="stage=queue"):
        Settings(queue_routes="segment").stage_queues()


def test_orchestrator_never_imports_torch():
    code = ("import sys, orchestrator.cli, orchestrator.cli_admin, orchestrator.service, "
            "orchestrator.dispatch, orchestrator.context, workers; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
