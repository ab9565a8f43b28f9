"""`inspect prompts ...` in the embedded default (the job runs inline) against the loopback LLM server."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from llm_server import GOOD_DEFECTS, Reply, good_answer

import orchestrator.cli_prompts  # noqa: F401  (registers the group until cli.py imports it)
from orchestrator.cli import cli
from orchestrator.cli_prompts import diff_content
from orchestrator.context import open_orchestrator
from prompts.filo import FILO_PIPELINE_KEY, load_filo_defaults
from storage import repo


def run(*args: str):
    return CliRunner().invoke(cli, ["prompts", *args])


def generate(*extra: str):
    return run("generate", "--category", "pcb1", "--llm", "openai", "--model", "test-model", "--wait", *extra)


def category_row(name: str = "pcb1"):
    orch = open_orchestrator()
    with orch.sessions() as s:
        cat = repo.get_category(s, name)
        return dict(cat.pipeline), cat.active_prompt_set.version


def test_generate_waits_and_prints_the_new_version(llm_env):
    res = generate("--notes", "lead-free solder")
    assert res.exit_code == 0, res.output
    assert "pcb1: prompt set v2, 5 phrases" in res.stdout
    assert all(f"  {p}" in res.stdout for p in GOOD_DEFECTS)
    assert "job " in res.stderr
    assert "lead-free solder" in llm_env.requests[0].body["messages"][1]["content"]


def test_generate_failure_exits_non_zero_with_the_reason(llm_env):
    llm_env.script(good_answer(["scratch", "here is your json"]))
    res = generate()
    assert res.exit_code == 1
    assert "failed: openai LLM: only 1 usable defect phrases" in res.output
    assert "v2" not in run("list", "--category", "pcb1").stdout


def test_generate_timeout_from_llm_is_reported(llm_env):
    llm_env.script(Reply(200, b"{}", delay=1.5))
    res = generate()
    assert res.exit_code == 1 and "did not answer within 0.5s" in res.output


def test_no_wait_prints_the_job_id(llm_env):
    res = run("generate", "--category", "pcb1", "--model", "m", "--no-wait")
    assert res.exit_code == 0 and res.stdout.startswith("job ") and "describe pcb1 with openai" in res.stdout


def test_list_show_diff_activate(llm_env):
    assert generate("--activate").exit_code == 0
    llm_env.script(good_answer(["missing component", "bent pin", "cold solder joint", "lifted pad"]))
    assert generate().exit_code == 0

    listed = run("list", "--category", "pcb1").stdout.splitlines()
    assert [line.split("\t")[0] for line in listed] == ["v1", "v2", "v3"]
    assert listed[0].split("\t")[1:3] == ["sdp", "dbscan"] and listed[0].endswith("ACTIVE")
    assert listed[1].split("\t")[1:4] == ["filo", "filo", "openai:test-model"] and listed[1].endswith("ACTIVE-FILO")
    assert "ACTIVE" not in listed[2]

    shown = json.loads(run("show", "--category", "pcb1", "--version", "3").stdout)
    assert shown["kind"] == "filo" and shown["content"]["phrases"][2] == "cold solder joint"
    assert shown["provenance"]["backend"] == "openai" and shown["active_filo"] is False

    diff = run("diff", "--category", "pcb1", "2", "3").stdout.splitlines()
    assert diff[:3] == ["--- pcb1 v2 (filo, openai:test-model)", "+++ pcb1 v3 (filo, openai:test-model)",
                        "@@ phrases @@"]
    assert diff[3:] == ["-scratch on the board", "-burnt mark", "-solder bridge", "+cold solder joint", "+lifted pad"]
    same = run("diff", "--category", "pcb1", "2", "2")
    assert same.exit_code == 0 and "same content" in same.stdout
    sdp_vs_filo = run("diff", "--category", "pcb1", "1", "2").stdout
    assert "@@ normal_states @@" in sdp_vs_filo and "+missing component" in sdp_vs_filo
    assert '@@ rvs_method @@\n-"dbscan"\n+"filo"' in sdp_vs_filo

    res = run("activate", "--category", "pcb1", "--version", "3")
    assert res.exit_code == 0 and "v3 is the active FiLo descriptions" in res.stdout
    pipeline, sdp_version = category_row()
    assert pipeline["stages"] == ["segment"] and sdp_version == 1
    assert json.loads(run("show", "--category", "pcb1", "--version", "3").stdout)["active_filo"] is True
    assert pipeline[FILO_PIPELINE_KEY] == json.loads(run("show", "--category", "pcb1", "--version", "3").stdout)["id"]

    assert run("activate", "--category", "pcb1", "--version", "1").exit_code == 0
    assert category_row()[1] == 1


def test_defaults_backend_and_errors(tmp_path):
    res = run("generate", "--category", "zipper", "--llm", "defaults")
    assert res.exit_code == 0, res.output
    assert f"zipper: prompt set v2, {len(load_filo_defaults('zipper'))} phrases" in res.stdout
    assert run("list", "--category", "nope").exit_code == 1
    bad = run("show", "--category", "zipper", "--version", "9")
    assert bad.exit_code == 1 and "no prompt set v9 (versions: [1, 2])" in bad.output
    assert run("generate", "--category", "bad{name}", "--llm", "defaults").exit_code == 1


@pytest.mark.parametrize("a,b,expected", [
    ({"phrases": ["a", "b"]}, {"phrases": ["b", "a"]}, ["@@ phrases @@", " (same items, different order)"]),
    ({"x": 1}, {"x": 2}, ["@@ x @@", "-1", "+2"]),
    ({"phrases": ["a"]}, {}, ["@@ phrases @@", "-a"]),
])
def test_diff_content(a, b, expected):
    assert diff_content(a, b) == expected
