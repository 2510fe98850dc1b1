"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine); this checks
them against the real console script, its commands and options, the settings, and the
ACL users of deploy/users.acl (which test_acl.py loads into a real redis-server), and
runs the "Run with Docker Compose" page (docs/deploy.md) against a redis-server with that
very ACL file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from charging.cli import app
from charging.settings import Settings
from tests.documents import section

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


@pytest.mark.parametrize("service", ["worker", "maintainer"])
def test_each_process_connects_as_its_own_acl_user_with_its_password(service):
    url = urlsplit(compose()["services"][service]["environment"]["CHARGING_REDIS_URL"])
    assert url.username == service
    assert acl_password_matches(service, url.password)


def test_one_maintainer_runs_beside_the_workers():
    services = compose()["services"]
    assert services["maintainer"]["command"] == ["maintain"]
    assert services["maintainer"].get("deploy", {}).get("replicas", 1) == 1
    assert services["maintainer"]["depends_on"]["redis"]["condition"] == "service_healthy"


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


# "Run with Docker Compose": its passwords, its commands, and its CLI lines run against a
# redis-server that loads deploy/users.acl as shipped, as the compose Redis does.

def compose_redis_on_the_host() -> str:
    """Where the compose Redis is published on the host: 127.0.0.1:PORT."""
    [published] = compose()["services"]["redis"]["ports"]
    address, port, inside = published.rsplit(":", 2)
    assert inside == "6379" and address == "127.0.0.1", "on loopback only"
    return f"{address}:{port}"


def code_blocks(text: str) -> list[list[str]]:
    """The lines of each ```sh block, comments dropped."""
    return [[line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
            for block in re.findall(r"```sh\n(.*?)```", text, re.S)]


def compose_passwords() -> dict[str, str]:
    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", section("Run with Docker Compose"), re.M)
    return dict(rows)


def test_the_docs_give_each_role_its_dev_password_as_the_acl_file_and_compose_hold_it():
    passwords = compose_passwords()
    assert set(passwords) == set(acl_users()) - {"default"}
    for user, password in passwords.items():
        assert acl_password_matches(user, password), f"the documented password of {user} is not the ACL file's"
    services = compose()["services"]
    for service in ("worker", "maintainer", "gateway"):
        assert urlsplit(services[service]["environment"]["CHARGING_REDIS_URL"]).password == passwords[service]
    assert services["redis"]["environment"]["REDISCLI_AUTH"] == passwords["admin"]


def test_the_documented_compose_commands_name_real_services():
    [docker, _] = code_blocks(section("Run with Docker Compose"))
    services = set(compose()["services"])
    for line in docker:
        words = line.split()
        assert words[:2] == ["docker", "compose"], line
        named = {w for w in words[3:] if not w.startswith("-")}
        assert named <= services, f"{line}: no such service"
    assert compose_redis_on_the_host() in section("Run with Docker Compose"), "the docs point the CLI at it"


def test_the_documented_cli_lines_run_against_the_compose_redis(tmp_path):
    from charging.tools.redis_server import RedisServer
    from tests.conftest import CHARGING

    [_, lines] = code_blocks(section("Run with Docker Compose"))
    plain = {k: v for k, v in os.environ.items() if not k.startswith("CHARGING_")}
    with RedisServer(tmp_path / "redis", extra_args=("--aclfile", str(ACL_FILE)),
                     credentials=("admin", compose_passwords()["admin"])) as server:
        here = f"127.0.0.1:{server.port}"
        # The compose services that run the engine, as compose runs them: the maintainer,
        # which loads the functions (one round done before the CLI lines, as compose's
        # maintainer is up before anyone charges), and a worker.
        loaded = service_process(plain, here, "maintainer", ["--once"])
        assert loaded.wait(60) == 0
        services = [service_process(plain, here, "maintainer", []),
                    service_process(plain, here, "worker", ["--consumer", "compose-worker"])]
        try:
            env = dict(plain)
            for line in lines:
                line = line.replace(compose_redis_on_the_host(), here)
                assert "127.0.0.1:" not in line.replace(here, ""), "never a Redis of this machine"
                if line.startswith("export "):
                    name, value = line.removeprefix("export ").split("=", 1)
                    env[name] = value
                    continue
                done = subprocess.run([CHARGING, *shlex.split(line)[1:]], env=env, capture_output=True, text=True,
                                      timeout=60)
                assert done.returncode == 0, f"{line}: {done.stderr}"
        finally:
            for process in services:
                process.terminate()
            assert [process.wait(30) for process in services] == [0, 0]


def service_process(plain: dict[str, str], here: str, service: str, options: list[str]) -> subprocess.Popen:
    """The compose service's command (one process, options of its own) with its environment,
    its Redis at here."""
    from tests.conftest import CHARGING

    definition = compose()["services"][service]
    env = {k: str(v) for k, v in definition["environment"].items()}
    env["CHARGING_REDIS_URL"] = env["CHARGING_REDIS_URL"].replace("redis:6379", here)
    return subprocess.Popen([CHARGING, definition["command"][0], *options], env={**plain, **env},
                            stderr=subprocess.DEVNULL)


def test_the_documented_command_that_moves_the_acl_to_another_namespace_moves_every_pattern():
    command = re.search(r"`(sed 's/~ch:/~billing:/g')`", section("Before running anywhere but a laptop"))[1]
    moved = subprocess.run(["sh", "-c", f"{command} deploy/users.acl"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout
    patterns = [rule.split("~", 1)[1] for line in moved.splitlines() for rule in line.split()[2:] if "~" in rule]
    assert patterns and all(p.startswith("billing:") for p in patterns), patterns


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
    assert url.username == "gateway" and acl_password_matches("gateway", url.password)


# Reproducible images: pinned bases, the constraints file, a small build context, and a
# published port that a local redis-server cannot hold.

EXACT_TAG = re.compile(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?")


def test_every_image_is_an_exact_release():
    [base] = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("FROM ")]
    images = [base] + [s["image"] for s in compose()["services"].values() if "image" in s]
    for image in images:
        assert EXACT_TAG.fullmatch(image), f"{image} floats: pin major.minor.patch (or a digest)"


def test_the_test_container_runs_the_compose_redis():
    from tests.conftest import COMPOSE_REDIS_IMAGE

    assert compose()["services"]["redis"]["image"] == COMPOSE_REDIS_IMAGE


def test_the_image_installs_with_the_constraints_file():
    [install] = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if "pip install" in line]
    assert "-c constraints.txt" in install
    copied = [line.split()[1:-1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    assert any("constraints.txt" in sources for sources in copied)


def test_the_build_context_leaves_out_virtualenvs_git_and_run_output():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "site", "bench-out", "chaos-out", "*.rdb", "appendonlydir", ".pytest_cache"} <= ignored
    assert not ignored & {"charging", "worker", "producer", "lua", "pyproject.toml", "README.md", "constraints.txt"}


def test_the_compose_redis_is_not_published_where_a_local_redis_server_listens():
    assert not compose_redis_on_the_host().endswith(":6379")
