"""Static checks of docker/: the compose file, both Dockerfiles, and the commands the docs show.

No Docker engine runs in CI, so these tests read the files. Every ``depends_on`` must name a
service that can satisfy its condition. Every service needs an image or a Dockerfile that exists.
Both images must install the project. Workers must start with ``celery -A workers worker -Q`` and
consume the same queue as the image's default command. The commands the images run must appear
verbatim in the top-level README.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
WORKER_DOCKERFILE = DOCKER / "Dockerfile.worker"
ORCHESTRATOR_DOCKERFILE = DOCKER / "Dockerfile.orchestrator"
DOCKERFILES = [WORKER_DOCKERFILE, ORCHESTRATOR_DOCKERFILE]

WORKER_PREFIX = "celery -A workers worker -Q"
# Commands the images run, which README.md must show verbatim.
MIGRATE_COMMAND = "inspect db upgrade"
WORKER_COMMAND = "celery -A workers worker -Q gpu"


# --- readers -------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "compose.yaml has no services"
    return doc


def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and pending):
            continue  # comments, and blank lines inside a continued instruction
        if not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return out


def exec_form(path: Path, keyword: str) -> list[str]:
    """The last CMD / ENTRYPOINT of a Dockerfile, which must be in JSON (exec) form."""
    found = [args for kw, args in instructions(path) if kw == keyword]
    assert found, f"{path.name} has no {keyword}"
    value = json.loads(found[-1])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"{path.name}: {keyword} must be exec form (a JSON list of strings)"
    )
    return value


def argv(command: str | list[Any]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def queue_of(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg in ("-Q", "--queues") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--queues="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no -Q in {' '.join(args)!r}")


def uses_solo_pool(args: list[str]) -> bool:
    joined = " ".join(args)
    return bool(re.search(r"(-P|--pool)[ =]solo\b", joined))


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return {name: (spec or {}) for name, spec in deps.items()}


def dockerfile_of(service: dict[str, Any]) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (DOCKER / build.get("context", ".")).resolve()
    return context / build.get("dockerfile", "Dockerfile")


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def copy_sources(path: Path) -> list[str]:
    """Source paths of every COPY/ADD without --from (those come from the build context)."""
    sources: list[str] = []
    for kw, args in instructions(path):
        if kw not in ("COPY", "ADD"):
            continue
        tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
        if any(t.startswith("--from") for t in tokens):
            continue
        tokens = [t for t in tokens if not t.startswith("--")]
        sources.extend(tokens[:-1])
    return sources


def run_commands(path: Path) -> list[list[str]]:
    """Every simple command of every RUN, as argv (split on && ; |)."""
    commands: list[list[str]] = []
    for kw, args in instructions(path):
        if kw != "RUN":
            continue
        tokens = [t for t in shlex.split(args) if not t.startswith("--mount=")]
        current: list[str] = []
        for t in [*tokens, ";"]:
            if t in ("&&", ";", "||", "|") or t.endswith(";"):
                if t.endswith(";") and t != ";":
                    current.append(t[:-1])
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(t)
    return commands


# --- compose ------------------------------------------------------------------------------------


def test_compose_defines_the_stack() -> None:
    expected = {"rabbitmq", "postgres", "s3", "migrate", "worker", "orchestrator"}
    assert expected <= set(services()), f"missing services: {expected - set(services())}"


def test_every_depends_on_names_an_existing_service_that_can_meet_its_condition() -> None:
    svcs = services()
    problems = []
    for name, svc in svcs.items():
        for dep, spec in depends_on(svc).items():
            if dep not in svcs:
                problems.append(f"{name} depends on unknown service {dep!r}")
                continue
            if dep == name:
                problems.append(f"{name} depends on itself")
            condition = spec.get("condition", "service_started")
            target = svcs[dep]
            if condition == "service_healthy":
                check = target.get("healthcheck") or {}
                if not check.get("test") or check.get("disable"):
                    problems.append(f"{name} waits for {dep} healthy, but {dep} has no healthcheck")
            elif condition == "service_completed_successfully":
                if str(target.get("restart", "no")) != "no":
                    problems.append(f"{name} waits for {dep} to complete, but {dep} restarts")
            elif condition != "service_started":
                problems.append(f"{name}: unknown depends_on condition {condition!r}")
    assert not problems, "\n".join(problems)


def test_every_service_uses_an_image_or_an_existing_dockerfile() -> None:
    problems = []
    for name, svc in services().items():
        dockerfile = dockerfile_of(svc)
        if dockerfile is not None:
            if not dockerfile.is_file():
                problems.append(f"{name}: Dockerfile {dockerfile} does not exist")
        elif not isinstance(svc.get("image"), str) or not svc["image"].strip():
            problems.append(f"{name}: neither image nor build")
    assert not problems, "\n".join(problems)


def test_workers_start_celery_on_a_queue_without_the_solo_pool() -> None:
    workers = {n: s for n, s in services().items() if n.startswith("worker")}
    assert "worker" in workers
    for name, svc in workers.items():
        args = argv(svc.get("command") or exec_form(WORKER_DOCKERFILE, "CMD"))
        assert " ".join(args).startswith(WORKER_PREFIX), f"{name}: {' '.join(args)!r}"
        assert not uses_solo_pool(args), f"{name}: -P solo blocks broker heartbeats during long tasks"


def test_worker_image_and_compose_consume_the_same_queue() -> None:
    cmd = exec_form(WORKER_DOCKERFILE, "CMD")
    assert " ".join(cmd).startswith(WORKER_PREFIX)
    assert not uses_solo_pool(cmd)
    compose_cmd = argv(services()["worker"]["command"])
    default_queue = Settings.model_fields["default_queue"].default
    assert queue_of(cmd) == queue_of(compose_cmd) == default_queue


def test_worker_reserves_an_nvidia_gpu() -> None:
    devices = services()["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_inspect_variables_are_real_settings() -> None:
    """A typo such as INSPECT_S3_ENDPIONT would be ignored silently by pydantic-settings."""
    known = {f"INSPECT_{name.upper()}" for name in Settings.model_fields}
    problems = [
        f"{name}: {key}"
        for name, svc in services().items()
        for key in environment(svc)
        if key.startswith("INSPECT_") and key not in known
    ]
    assert not problems, "unknown settings: " + ", ".join(problems)


def test_migrate_runs_inspect_db_upgrade_from_the_orchestrator_image() -> None:
    migrate = services()["migrate"]
    assert dockerfile_of(migrate) == ORCHESTRATOR_DOCKERFILE.resolve()
    entrypoint = (
        argv(migrate["entrypoint"])
        if "entrypoint" in migrate
        else exec_form(ORCHESTRATOR_DOCKERFILE, "ENTRYPOINT")
    )
    assert " ".join(entrypoint + argv(migrate["command"])) == MIGRATE_COMMAND


def test_cli_service_takes_its_arguments_from_docker_compose_run() -> None:
    cli = services()["orchestrator"]
    assert dockerfile_of(cli) == ORCHESTRATOR_DOCKERFILE.resolve()
    assert exec_form(ORCHESTRATOR_DOCKERFILE, "ENTRYPOINT") == ["inspect"]
    assert "entrypoint" not in cli and "command" not in cli


# --- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_the_project(dockerfile: Path) -> None:
    installs = [c for c in run_commands(dockerfile) if c[:2] == ["pip", "install"] and "." in c[2:]]
    assert installs, f"{dockerfile.name}: no `pip install .`"
    copied = {Path(s).parts[0] for s in copy_sources(dockerfile)}
    project = pyproject()
    packages = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    needed = {"pyproject.toml", project["project"]["readme"], *packages}
    assert needed <= copied, f"{dockerfile.name} does not copy {sorted(needed - copied)}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_existing_paths(dockerfile: Path) -> None:
    # README.md is among them: pyproject names it, so `pip install .` needs it.
    missing = [s for s in copy_sources(dockerfile) if not (ROOT / s).exists()]
    assert not missing, f"{dockerfile.name} copies paths missing from the repository: {missing}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_a_non_root_user(dockerfile: Path) -> None:
    users = [args.split(":")[0] for kw, args in instructions(dockerfile) if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} runs as root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_version_pins_match_pyproject(dockerfile: Path) -> None:
    pins = {}
    for dep in pyproject()["project"]["dependencies"]:
        if "==" in dep:
            name, version = dep.split("==", 1)
            pins[name.split("[")[0].strip().lower()] = version.strip()
    for command in run_commands(dockerfile):
        for token in command:
            name, sep, version = token.partition("==")
            if sep and name.lower() in pins:
                assert version == pins[name.lower()], f"{dockerfile.name}: {token} vs pyproject"


# --- documentation ------------------------------------------------------------------------------


def test_readme_shows_the_commands_the_images_run() -> None:
    # The strings are derived from the files, so a change there shows up here.
    migrate = services()["migrate"]
    entrypoint = exec_form(ORCHESTRATOR_DOCKERFILE, "ENTRYPOINT")
    assert " ".join(entrypoint + argv(migrate["command"])) == MIGRATE_COMMAND
    assert " ".join(exec_form(WORKER_DOCKERFILE, "CMD")[:6]) == WORKER_COMMAND
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.fail(f"{readme} is missing; it must show {MIGRATE_COMMAND!r} and {WORKER_COMMAND!r}")
    text = readme.read_text()
    missing = [c for c in (MIGRATE_COMMAND, WORKER_COMMAND) if c not in text]
    assert not missing, f"README.md does not show {missing}"


def test_docker_readme_commands_match_compose() -> None:
    text = (DOCKER / "README.md").read_text()
    compose = "docker compose -f docker/compose.yaml"
    assert f"{compose} up -d" in text
    assert f"{compose} run --rm orchestrator " in text
    assert "inspect models import FILE --name NAME" in text
    for service in re.findall(rf"{re.escape(compose)} run --rm (?:-v \S+ \\\s+)?(\S+)", text):
        assert service in services(), f"docker/README.md runs unknown service {service!r}"


def test_stage_override_runs_one_worker_per_stage_queue() -> None:
    """compose.stages.yaml: every stage queue has a worker, every process routes alike."""
    import yaml

    from common.settings import Settings

    base = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    over = yaml.safe_load((ROOT / "docker" / "compose.stages.yaml").read_text())
    routes = over["x-routes"]["INSPECT_QUEUE_ROUTES"]
    queues = set(Settings(queue_routes=routes).stage_queues().values())
    consumed = set()
    for name, svc in over["services"].items():
        if "extends" in svc:
            assert svc["extends"]["service"] in base["services"]
            cmd = svc["command"]
            assert cmd[:5] == ["celery", "-A", "workers", "worker", "-Q"]
            consumed.add(cmd[5])
            assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        else:
            assert name in base["services"]
        assert svc["environment"]["INSPECT_QUEUE_ROUTES"] == routes
    assert consumed == queues
