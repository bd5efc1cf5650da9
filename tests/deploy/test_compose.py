"""The deployment files agree with the code: docker-compose.yml, its aws-emulator override, the env
files and the Dockerfile only use real `centroid` commands and real settings, and their ports,
volumes, healthchecks and dependencies fit together. (No Docker daemon is needed.)"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dotenv import dotenv_values
from pydantic import AliasChoices
from sqlalchemy.engine import make_url

from service.cli import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
EMULATOR_COMPOSE = ROOT / "docker-compose.aws-emulator.yml"
EMULATOR_ENV = ROOT / "deploy" / "aws-emulator.env"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

CENTROID_SERVICES = ("api", "worker")
# boto3's own credential variables: the one non-setting the emulator needs (dummy values).
BOTO3_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


# --- helpers ----------------------------------------------------------------------------------


def _yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def setting_env_names() -> set[str]:
    """Every environment variable name Settings reads."""
    prefix = Settings.model_config.get("env_prefix", "")
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice.upper() for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """`environment:` in its mapping or list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _env_files(service: dict[str, Any]) -> list[Path]:
    entries = service.get("env_file") or []
    entries = [entries] if isinstance(entries, str | dict) else entries
    return [ROOT / (entry["path"] if isinstance(entry, dict) else entry) for entry in entries]


_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, from the project's .env."""

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        current = variables.get(name)
        if op in (":-", "-"):
            return current if current else arg
        assert current, f"${{{name}}} is required ({arg}) but .env.example does not set it"
        return current

    assert "$$" not in value
    return _INTERPOLATION.sub(substitute, value)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _parse_centroid(argv: list[str]) -> Any:
    assert argv and argv[0] == "centroid", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on an unknown command or flag
        raise AssertionError(f"not a valid centroid command: {shlex.join(argv)}") from exc


def _container_env(service: dict[str, Any], variables: dict[str, str]) -> dict[str, str]:
    """What the container would see: env files first, then `environment:` (which wins)."""
    env: dict[str, str] = {}
    for path in _env_files(service):
        source = ENV_EXAMPLE if path.name == ".env" else path  # .env is a copy of .env.example
        env.update({key: value or "" for key, value in dotenv_values(source).items()})
    env.update({key: _interpolate(value, variables) for key, value in _environment(service).items()})
    return env


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in setting_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port, from "host:container" short syntax or the long syntax."""
    mapping: dict[int, int] = {}
    port: Any
    for port in service.get("ports", []):
        if isinstance(port, dict):
            mapping[int(port["target"])] = int(port["published"] if "published" in port else port["target"])
            continue
        assert isinstance(port, str), f"quote port mappings (YAML reads 8000:8000 as a number): {port!r}"
        parts = port.split("/")[0].split(":")
        mapping[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return mapping


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """volume source -> mount path."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["source"]] = volume["target"]
        else:
            source, target = volume.split(":")[:2]
            mounts[source] = target
    return mounts


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


# --- commands ---------------------------------------------------------------------------------


def test_every_centroid_command_is_a_real_subcommand(services: dict[str, dict[str, Any]]) -> None:
    runs_centroid = {name: _command(svc) for name, svc in services.items() if _command(svc)[:1] == ["centroid"]}
    assert set(runs_centroid) == set(CENTROID_SERVICES)
    for argv in runs_centroid.values():
        _parse_centroid(argv)


def _option_strings(*command: str) -> set[str]:
    """The flags `centroid <command...>` really accepts (argparse would also take a prefix of one)."""
    parser = build_parser()
    for name in command:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[name]
    return {option for action in parser._actions for option in action.option_strings}


def test_the_api_serves_on_all_interfaces_without_an_embedded_worker(services: dict[str, dict[str, Any]]) -> None:
    argv = _command(services["api"])
    args = _parse_centroid(argv)
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    assert args.no_worker, "training belongs to the worker containers"
    # Several API processes behind one port, spelled with the real flag (not an abbreviation).
    assert args.workers > 1
    flags = [part for part in argv if part.startswith("--")]
    assert "--workers" in flags and set(flags) <= _option_strings("serve"), flags
    assert _published(services["api"]) == {args.port: 8000}
    health = _healthcheck_text(services["api"])
    assert f"127.0.0.1:{args.port}/healthz" in health


def test_two_worker_replicas(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert _parse_centroid(_command(worker)).command == "worker"
    assert worker["deploy"]["replicas"] > 1, "the compose file shows a team's topology: workers scale out"
    assert "ports" not in worker, "replicas cannot share a published port, and workers serve nothing"
    # The heartbeat check reads the table the worker writes.
    assert "FROM workers" in _healthcheck_text(worker) and "heartbeat_at" in _healthcheck_text(worker)


# --- environment ------------------------------------------------------------------------------


def test_every_centroid_variable_is_a_real_setting(services: dict[str, dict[str, Any]]) -> None:
    known = setting_env_names()
    assert "CENTROID_DATABASE_URL" in known and "CENTROID_API_KEYS" in known
    sources: dict[str, list[str]] = {f"{name}.environment": list(_environment(svc)) for name, svc in services.items()}
    for path in (ENV_EXAMPLE, EMULATOR_ENV):
        sources[path.name] = list(dotenv_values(path))
    for source, names in sources.items():
        unknown = [name for name in names if name.startswith("CENTROID_") and name not in known]
        assert not unknown, f"{source} sets {unknown}, which are not settings in service/settings.py"


def test_services_are_configured_only_by_their_own_variables(services: dict[str, dict[str, Any]]) -> None:
    for name in CENTROID_SERVICES:
        assert all(key.startswith("CENTROID_") for key in _environment(services[name])), name
    assert all(key.startswith("POSTGRES_") for key in _environment(services["postgres"]))
    assert all(key.startswith(("CENTROID_", "POSTGRES_")) for key in dotenv_values(ENV_EXAMPLE))
    assert set(dotenv_values(EMULATOR_ENV)) - BOTO3_CREDENTIALS <= setting_env_names()


def test_the_api_and_worker_environment_loads_as_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    variables = {key: value or "" for key, value in dotenv_values(ENV_EXAMPLE).items()}
    for name in CENTROID_SERVICES:
        settings = _settings_from(_container_env(services[name], variables), monkeypatch)
        # The URL the service connects with names the user, password and database the postgres
        # container creates, and the postgres service by its compose name.
        url = make_url(settings.resolved_database_url)
        postgres_env = _container_env(services["postgres"], variables)
        assert url.get_backend_name() == "postgresql" and url.host == "postgres" and (url.port or 5432) == 5432
        assert (url.username, url.password, url.database) == (
            postgres_env["POSTGRES_USER"],
            postgres_env["POSTGRES_PASSWORD"],
            postgres_env["POSTGRES_DB"],
        )
        assert "${POSTGRES_PASSWORD" in _environment(services["postgres"])["POSTGRES_PASSWORD"], "from .env"
        # The sagemaker emulator is opt-in: the base file never points anything at it.
        assert settings.aws_endpoint_url is None


# --- volumes, dependencies, healthchecks ------------------------------------------------------


def test_volumes_are_declared_and_artifacts_are_shared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source in _mounts(service):
            assert source.startswith((".", "/")) or source in declared, f"{name} uses undeclared volume {source!r}"

    api_mounts, worker_mounts = _mounts(services["api"]), _mounts(services["worker"])
    shared = {source for source in api_mounts if api_mounts[source] == worker_mounts.get(source)}
    assert "artifacts" in shared, "api and worker must mount the artifacts volume at the same path"
    mount = Path(api_mounts["artifacts"])

    variables = {key: value or "" for key, value in dotenv_values(ENV_EXAMPLE).items()}
    for name in CENTROID_SERVICES:
        env = _container_env(services[name], variables)
        assert "CENTROID_ARTIFACT_DIR" in env and "CENTROID_DATA_DIR" in env
        settings = _settings_from(env, monkeypatch)
        assert settings.resolved_artifact_dir.is_relative_to(mount), settings.resolved_artifact_dir
        assert settings.data_dir.is_relative_to(mount)
    assert _mounts(services["postgres"]).get("postgres-data") == "/var/lib/postgresql/data"


def test_healthchecks_and_startup_order(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name != "moto-setup":  # a one-shot job, not a long-running service
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "pg_isready" in _healthcheck_text(services["postgres"])
    for name in CENTROID_SERVICES:
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert "profiles" not in services[name]


# --- the aws-emulator profile -----------------------------------------------------------------


def test_the_aws_emulator_profile_is_optional_and_consistent(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    moto = services["moto"]
    assert moto["profiles"] == ["aws-emulator"] and services["moto-setup"]["profiles"] == ["aws-emulator"]
    assert services["moto-setup"]["depends_on"]["moto"]["condition"] == "service_healthy"
    assert _env_files(services["moto-setup"]) == [EMULATOR_ENV]

    override = _yaml(EMULATOR_COMPOSE)["services"]
    assert set(override) == set(CENTROID_SERVICES)
    variables = {key: value or "" for key, value in dotenv_values(ENV_EXAMPLE).items()}
    for name in CENTROID_SERVICES:
        assert _env_files(override[name]) == [EMULATOR_ENV]
        merged = {**services[name], "env_file": services[name]["env_file"] + override[name]["env_file"]}
        settings = _settings_from(_container_env(merged, variables), monkeypatch)
        # The endpoint is the moto service, by its compose name, on the port its container listens on.
        endpoint = urlsplit(settings.aws_endpoint_url or "")
        assert endpoint.hostname == "moto" and endpoint.port in _published(moto), endpoint
        assert settings.aws_region and settings.s3_bucket and settings.sagemaker_role_arn

    emulator = dotenv_values(EMULATOR_ENV)
    assert {emulator[name] for name in BOTO3_CREDENTIALS} == {"testing"}, "dummy credentials only"


# --- env files --------------------------------------------------------------------------------


def test_env_example_parses_and_holds_only_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {key: value or "" for key, value in dotenv_values(ENV_EXAMPLE).items()}
    assert set(values) >= {"POSTGRES_PASSWORD", "CENTROID_API_KEYS"}
    assert json.loads(values["CENTROID_API_KEYS"]) == []
    settings = _settings_from({"CENTROID_API_KEYS": values["CENTROID_API_KEYS"]}, monkeypatch)
    assert settings.api_keys == []
    text = ENV_EXAMPLE.read_text()
    assert not re.search(r"\b[0-9a-f]{64}\b", text), "a key hash belongs in .env, not in the example"
    assert "cnt_" not in text, "an API key belongs to its client, not in a file"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# --- the image --------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile instructions with continuation lines joined."""
    logical = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_the_image_is_slim_non_root_and_healthchecked() -> None:
    instructions = _instructions(DOCKERFILE)
    final_stage = instructions[max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM") :]
    # A slim Python image of a version the package supports.
    image = final_stage[0][1].split()[0]
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", image)
    assert match, image
    minimum = re.search(
        r"(\d+)\.(\d+)", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    )
    assert minimum and (int(match[1]), int(match[2])) >= (int(minimum[1]), int(minimum[2])), image

    users = [value for keyword, value in final_stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the container must not run as root"

    healthchecks = [value for keyword, value in final_stage if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/healthz" in healthchecks[0] and "urllib" in healthchecks[0]
    assert ("EXPOSE", "8000") in final_stage

    installs = [value for keyword, value in instructions if keyword == "RUN" and "pip install" in value]
    assert installs and not any("[test]" in value or "[dev]" in value for value in installs)

    cmd = json.loads(next(value for keyword, value in final_stage if keyword == "CMD"))
    args = _parse_centroid(cmd)
    assert args.command == "serve" and f"127.0.0.1:{args.port}/healthz" in healthchecks[0]

    for keyword, value in final_stage:
        if keyword == "ENV":
            names = re.findall(r"(\w+)=", value)
            centroid = [name for name in names if name.startswith("CENTROID_")]
            assert set(centroid) <= setting_env_names(), centroid


def test_the_image_gets_what_it_copies_and_nothing_secret() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    ignored = {line for line in lines if line and not line.startswith("#")}
    assert {".env*", ".venv", ".git", "tests"} <= ignored
    copies = [value for keyword, value in _instructions(DOCKERFILE) if keyword == "COPY" and "--from" not in value]
    copied = [value.split()[0] for value in copies]
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") not in ignored, f"{source} is copied but .dockerignore leaves it out"
    # Every package pyproject ships is copied into the image.
    for package in ("service", "schemas", "workers"):
        assert package in copied
