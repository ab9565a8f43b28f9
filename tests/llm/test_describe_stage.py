"""The describe stage in-process on SQLite against the loopback LLM server."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from llm_server import API_KEY, GOOD_DEFECTS, Reply, good_answer, ok

from common.settings import reset_settings
from orchestrator.context import open_orchestrator
from orchestrator.service import ensure_category
from prompts.filo import FILO_PIPELINE_KEY, GENERIC_STATES, load_describe_instruction, load_filo_defaults
from storage import job_repo, repo
from storage.orm import JobStatus
from workers.describe import build_instruction, object_name, record_describe_failure, run_describe
from workers.finalize import StageFailed
from workers.jobs import run_job_inline
from workers.llm.base import LLMUnavailable
from workers.runtime import context


@pytest.fixture
def ctx(request: pytest.FixtureRequest):
    if "llm_env" in request.fixturenames:  # settings are read once per context: the LLM env must come first
        request.getfixturevalue("llm_env")
    reset_settings()
    return context()


def new_job(category: str = "pcb1", **params: Any) -> str:
    orch = open_orchestrator()
    with orch.sessions.begin() as s:
        ensure_category(s, category, orch.settings)
        return job_repo.create_job(s, "describe", {"category": category, "llm": "openai", "model": "test-model",
                                                    **params}).id


def state(ctx, job_id: str, category: str = "pcb1") -> dict[str, Any]:
    with ctx.sessions() as s:
        job = job_repo.get_job(s, job_id)
        cat = repo.get_category(s, category)
        sets = repo.list_prompt_sets(s, cat)
        return {"status": job.status, "error": job.error, "result": job.result, "attempts": job.attempts,
                "sets": [(p.version, p.kind) for p in sets], "last": sets[-1], "pipeline": dict(cat.pipeline),
                "active_id": cat.active_prompt_set_id, "first_id": sets[0].id}


def test_success_stores_one_new_version_with_provenance(ctx, llm_env):
    job_id = new_job(notes="FR-4 boards with SMD parts", captions=["a green board with a chip"])
    assert run_describe(job_id, ctx) == job_id
    st = state(ctx, job_id)
    assert st["status"] == JobStatus.done and st["error"] is None
    assert st["sets"] == [(1, "sdp"), (2, "filo")]
    ps = st["last"]
    assert st["result"] == {"prompt_set_id": ps.id, "version": 2, "category": "pcb1", "phrases": 5,
                            "activated": False}
    assert ps.rvs_method == "filo" and ps.content == {"phrases": GOOD_DEFECTS, "generic": GENERIC_STATES}
    prov = ps.provenance
    assert prov["backend"] == "openai" and prov["model"] == "test-model"
    assert prov["base_url_host"] == llm_env.host and prov["instruction_version"] == "v1"
    assert prov["job_id"] == job_id and prov["time"] and prov["dropped"] == []
    assert json.loads(prov["raw_answer"]) == {"defects": GOOD_DEFECTS}
    assert prov["parameters"]["temperature"] == 0.2 and prov["parameters"]["notes"] == "FR-4 boards with SMD parts"
    assert API_KEY not in json.dumps(prov)
    # Not activated: the SDP set stays active and the pipeline names no FiLo set.
    assert st["active_id"] == st["first_id"] and FILO_PIPELINE_KEY not in st["pipeline"]
    user = llm_env.requests[0].body["messages"][1]["content"]
    assert "pcb" in user and "FR-4 boards with SMD parts" in user and "a green board with a chip" in user


def test_activate_records_the_filo_set_in_the_pipeline(ctx, llm_env):
    job_id = new_job(activate=True, temperature=0.0)
    run_describe(job_id, ctx)
    st = state(ctx, job_id)
    assert st["pipeline"] == {"stages": ["segment"], FILO_PIPELINE_KEY: st["last"].id}
    assert st["active_id"] == st["first_id"]  # the segment stage's SDP set is untouched
    assert llm_env.requests[0].body["temperature"] == 0.0


def test_redelivery_after_done_is_a_no_op(ctx, llm_env):
    job_id = new_job()
    run_describe(job_id, ctx)
    run_describe(job_id, ctx)
    st = state(ctx, job_id)
    assert st["sets"] == [(1, "sdp"), (2, "filo")] and st["attempts"] == 1
    assert len(llm_env.requests) == 1


def test_dropped_items_are_recorded(ctx, llm_env):
    llm_env.script(good_answer([*GOOD_DEFECTS, "Here is your JSON", "bent pin"]))
    job_id = new_job()
    run_describe(job_id, ctx)
    prov = state(ctx, job_id)["last"].provenance
    assert prov["dropped"] == [["Here is your JSON", "echoes the instruction"], ["bent pin", "duplicate"]]


@pytest.mark.parametrize("reply,reason", [
    (ok("Sure! Defects: scratch, crack."), "not valid JSON"),
    (ok(json.dumps({"defects": ["scratch", "json output"]})), "only 1 usable defect phrases"),
    (Reply(200, b"not json at all"), "malformed JSON"),
    (Reply(200, json.dumps({"choices": []}).encode()), "no choices"),
    (Reply(401, b'{"error": {"message": "Incorrect API key"}}'), "HTTP 401: Incorrect API key"),
])
def test_bad_answers_fail_the_job_and_store_nothing(ctx, llm_env, reply: Reply, reason: str):
    llm_env.script(reply)
    job_id = new_job()
    with pytest.raises(StageFailed, match=reason):
        run_describe(job_id, ctx)
    run_job_inline("describe", job_id, ctx)  # the embedded runner records it (queued tasks do the same)
    st = state(ctx, job_id)
    assert st["status"] == JobStatus.failed and reason in st["error"] and st["error"].startswith("openai LLM: ")
    assert st["sets"] == [(1, "sdp")]


def test_slow_answer_is_transient_then_recorded(ctx, llm_env):
    llm_env.script(Reply(200, b"{}", delay=1.5))
    job_id = new_job()
    with pytest.raises(LLMUnavailable, match="did not answer within 0.5s"):
        run_describe(job_id, ctx)
    assert state(ctx, job_id)["status"] == JobStatus.running  # left for the task's retry
    record_describe_failure(ctx, job_id, "infrastructure unavailable: LLM timed out")
    st = state(ctx, job_id)
    assert st["status"] == JobStatus.failed and "timed out" in st["error"] and st["sets"] == [(1, "sdp")]


def test_embedded_runner_records_an_unreachable_llm(ctx, llm_env, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed before the request: nothing listens there
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    job_id = new_job()
    run_job_inline("describe", job_id, ctx)
    st = state(ctx, job_id)
    assert st["status"] == JobStatus.failed and st["error"].startswith(f"LLMUnavailable: cannot reach 127.0.0.1:{port}")


def test_missing_model_and_unknown_backend(ctx, llm_env):
    job_id = new_job(model=None)
    with pytest.raises(StageFailed, match="no LLM model"):
        run_describe(job_id, ctx)
    job_id = new_job(llm="gpt-by-carrier-pigeon")
    with pytest.raises(StageFailed, match="unknown LLM backend"):
        run_describe(job_id, ctx)


def test_model_from_environment(ctx, llm_env, monkeypatch):
    monkeypatch.setenv("INSPECT_LLM_MODEL", "env-model")
    job_id = new_job(model=None)
    run_describe(job_id, ctx)
    assert llm_env.requests[0].body["model"] == "env-model"
    assert state(ctx, job_id)["last"].provenance["model"] == "env-model"


def test_defaults_backend_needs_no_llm(ctx):
    job_id = new_job("metal_nut", llm="defaults", model=None)
    run_describe(job_id, ctx)
    ps = state(ctx, job_id, "metal_nut")["last"]
    assert ps.content["phrases"] == load_filo_defaults("metal_nut")
    assert ps.provenance["backend"] == "defaults" and ps.provenance["base_url_host"] is None


def test_local_backend_answer_is_rejected_clearly(ctx, tiny_lm):
    job_id = new_job(llm="local", local_path=str(tiny_lm), model=None)
    run_job_inline("describe", job_id, ctx)
    st = state(ctx, job_id)
    assert st["status"] == JobStatus.failed and st["error"].startswith("local LLM: ") and st["sets"] == [(1, "sdp")]


def test_unknown_job_and_failure_on_ended_job(ctx, llm_env, caplog):
    with pytest.raises(StageFailed, match="no job"):
        run_describe("00000000-0000-0000-0000-000000000000", ctx)
    record_describe_failure(ctx, "00000000-0000-0000-0000-000000000000", "whatever")  # logged, no crash
    job_id = new_job()
    run_describe(job_id, ctx)
    record_describe_failure(ctx, job_id, "late failure")
    assert state(ctx, job_id)["status"] == JobStatus.done


def test_instruction_rendering():
    template = load_describe_instruction("v1")
    system, user = build_instruction(template, "metal_nut", "notes with {object} braces", ["", "a shiny nut"])
    assert "{" not in system
    assert 'Object: metal nut (inspection category "metal_nut")' in user
    assert "- notes with {object} braces" in user and "- a photo shows: a shiny nut" in user
    assert '{"defects": ["...", "..."]}' in user
    _, bare = build_instruction(template, "pcb1")
    assert "operator:\nnone" in bare
    assert object_name("pcb1") == "pcb" and object_name("macaroni2") == "macaroni" and object_name("7up") == "7up"
    with pytest.raises(ValueError):
        load_describe_instruction("../x")
