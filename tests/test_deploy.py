"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine); this checks
them against the real console script, its commands and options, the settings, and the
ACL users of deploy/users.acl (which test_acl.py loads into a real redis-server)."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import typer.main
import yaml

from charging.cli import app
from charging.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ACL_FILE = ROOT / "deploy" / "users.acl"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def acl_users() -> dict[str, list[str]]:
    """user name -> its rules, as written in deploy/users.acl."""
    return {line.split()[1]: line.split()[2:] for line in ACL_FILE.read_text().splitlines() if line.strip()}


def acl_password_matches(user: str, password: str) -> bool:
    return "#" + hashlib.sha256(password.encode()).hexdigest() in acl_users()[user]


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
        if "build" not in service:  # the redis image has variables of its own
            continue
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
    assert command[command.index("--appendfsync") + 1] == "always"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    url = urlsplit(services["worker"]["environment"]["CHARGING_REDIS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379) and re.fullmatch(r"/\d+", url.path)


def test_compose_redis_loads_the_shipped_acl_file():
    redis_service = compose()["services"]["redis"]
    command = redis_service["command"]
    inside = command[command.index("--aclfile") + 1]
    assert f"./deploy/users.acl:{inside}:ro" in redis_service["volumes"]
    assert "off" in acl_users()["default"], "no one may connect without a user and password"


def test_workers_connect_as_the_worker_acl_user_with_its_password():
    url = urlsplit(compose()["services"]["worker"]["environment"]["CHARGING_REDIS_URL"])
    assert url.username == "worker"
    assert acl_password_matches("worker", url.password)


def test_the_healthcheck_authenticates_as_an_acl_user():
    redis_service = compose()["services"]["redis"]
    check = redis_service["healthcheck"]["test"]
    user = check[check.index("--user") + 1]
    assert acl_password_matches(user, redis_service["environment"]["REDISCLI_AUTH"])
    assert "-e" in check, "redis-cli must exit non-zero on an error reply such as NOAUTH"


def test_acl_key_patterns_are_in_the_namespace_the_workers_use():
    namespace = compose()["services"]["worker"]["environment"].get("CHARGING_NAMESPACE",
                                                                   Settings.model_fields["namespace"].default)
    patterns = [rule.split("~", 1)[1] for rules in acl_users().values() for rule in rules if "~" in rule]
    assert patterns and all(p.startswith(f"{namespace}:") for p in patterns), patterns


def test_the_metrics_port_is_exposed_by_the_image_and_the_service():
    worker = compose()["services"]["worker"]
    port = worker["command"][worker["command"].index("--metrics-port") + 1]
    assert port in worker["expose"]
    assert port in dockerfile_instruction("EXPOSE").split()


def test_the_gateway_listens_beyond_loopback_only_with_the_keys_file_it_mounts():
    from charging.app.http.access import Keyring

    gateway = compose()["services"]["gateway"]
    command, env = gateway["command"], gateway["environment"]
    assert command[0] == "serve" and command[command.index("--host") + 1] == "0.0.0.0"
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in gateway["volumes"]}
    keys = Keyring.load(ROOT / mounted[env["CHARGING_HTTP_KEYS_FILE"]])
    assert keys.identify("chk_gateway-dev-only").scopes == {"charge", "authorize", "reserve", "read", "admin"}
    assert command[command.index("--port") + 1] in dockerfile_instruction("EXPOSE").split()
    url = urlsplit(env["CHARGING_REDIS_URL"])
    assert url.username == "authorizer" and acl_password_matches("authorizer", url.password)
