"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine); this checks
them against the real console script, its commands and options, and the settings."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import typer.main
import yaml

from charging.cli import app
from charging.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile_instruction(name: str) -> str:
    [line] = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith(name + " ")]
    return line[len(name) + 1:]


def test_image_entrypoint_is_the_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert json.loads(dockerfile_instruction("ENTRYPOINT")) == [next(iter(scripts))]
    assert json.loads(dockerfile_instruction("CMD"))[0] in typer.main.get_command(app).commands


def test_image_copies_every_package_and_the_lua_library():
    copied = {line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")}
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert set(wheel["packages"]) <= copied
    assert "lua" in copied and (ROOT / "lua" / "charging.lua").exists()


def test_compose_commands_and_options_exist_in_the_cli():
    commands = typer.main.get_command(app).commands
    for name, service in compose()["services"].items():
        if "build" not in service:
            continue
        command, *args = service["command"]
        assert command in commands, f"{name}: no `charging {command}`"
        known = {opt for p in commands[command].params for opt in p.opts}
        for arg in args:
            if arg.startswith("--"):
                assert arg.split("=")[0] in known, f"{name}: `charging {command}` has no {arg}"


def test_compose_environment_is_made_of_real_settings_with_valid_values(monkeypatch):
    fields = {f"CHARGING_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        env = service.get("environment", {})
        for key, value in env.items():
            assert key in fields, f"{name}: {key} is not a setting"
            monkeypatch.setenv(key, str(value))
        if env:
            Settings()  # raises if a value is invalid


def test_compose_redis_keeps_an_append_only_file_and_workers_wait_for_it():
    services = compose()["services"]
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert services["redis"]["volumes"]
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    url = services["worker"]["environment"]["CHARGING_REDIS_URL"]
    assert re.fullmatch(r"redis://redis:6379/\d+", url)
