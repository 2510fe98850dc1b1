"""What a newcomer's first commands install and leave behind: the system packages of each
`make` target, the pinned Python packages, the files a local redis-server writes into the
checkout, and the documented `pip install` lines."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.documents import DOCS, ROOT

SYSTEM_DEPS = "./scripts/install-system-deps"


def system_packages(target: str) -> set[str]:
    """The system packages `make TARGET` asks scripts/install-system-deps for, read from
    the commands make would run (make -n runs none of them)."""
    planned = subprocess.run(["make", "-n", target, "VENV=never-made"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    asked = [line.split()[1] for line in planned.splitlines() if line.startswith(SYSTEM_DEPS)]
    packages = set()
    for group in asked:
        packages |= set(subprocess.run([SYSTEM_DEPS, "--list", group], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout.split())
    return packages


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_each_make_target_installs_only_the_system_packages_it_needs():
    assert system_packages("demo") == {"redis-server"}
    assert system_packages("chaos") == {"redis-server"}
    assert system_packages("bench") == {"redis-server", "memcached"}
    assert system_packages("test") >= {"redis-server", "openssl", "curl", "memcached"}
    assert system_packages("docs") == set()


def test_the_dry_run_names_the_missing_packages_and_installs_nothing(tmp_path):
    """On a machine with apt-get and nothing else: the commands, printed, not run (the
    apt-get here fails if called)."""
    (tmp_path / "apt-get").write_text("#!/bin/sh\nexit 99\n")
    (tmp_path / "apt-get").chmod(0o755)
    (tmp_path / "id").symlink_to(shutil.which("id"))
    done = subprocess.run([shutil.which("bash"), SYSTEM_DEPS, "--dry-run", "demo"], cwd=ROOT, env={"PATH": str(tmp_path)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].endswith("apt-get install -y -qq redis-server")


def test_the_readme_says_what_each_target_installs():
    readme = (ROOT / "README.md").read_text()
    [demo] = [line for line in readme.splitlines() if line.startswith("make demo")]
    assert "redis-server" in demo and "chromium" not in demo
    [test] = [line for line in readme.splitlines() if line.startswith("make test")]
    assert "chromium" in test


def test_what_a_local_redis_server_writes_into_the_checkout_is_ignored():
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "dump.rdb", "appendonlydir/appendonly.aof.1.base.rdb",
                              "appendonly.aof"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert ignored == ["dump.rdb", "appendonlydir/appendonly.aof.1.base.rdb", "appendonly.aof"]


# Python packages: the constraints file pins every one of them, the Makefile and the image
# install with it, and the documented pip lines name real extras.

def pinned() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_the_constraints_pin_every_dependency_of_every_extra_and_not_the_project():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {canonical(re.match(r"[A-Za-z0-9_.-]+", r)[0]) for r in requirements}
    versions = {canonical(name): version for name, version in pinned().items()}
    assert names <= set(versions), names - set(versions)
    assert canonical(project["name"]) not in versions
    assert all(re.fullmatch(r"[\w.!+]+", version) for version in versions.values())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt -e", makefile)
    assert re.search(r"^\$\(VENV\)/\.installed: .*constraints\.txt", makefile, re.M), "a new pin reinstalls"


def test_cli_and_web_frameworks_have_an_upper_bound():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["http"]
    for name in ("typer", "starlette", "redis[hiredis]"):
        [spec] = [r for r in requirements if r.startswith(name + ">")]
        assert "<" in spec, spec


PIP_LINE = re.compile(r"pip install (?:-[ce] \S+ )*-e '\.\[(?P<extras>[\w,]+)\]'")


@pytest.mark.parametrize("document", ["README.md", "docs/getting-started.md"])
def test_the_documented_pip_install_names_real_extras_and_each_is_explained(document):
    text = (ROOT / document).read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lines = list(PIP_LINE.finditer(text))
    assert lines, f"{document} has no `pip install -e '.[...]'`"
    for line in lines:
        assert set(line["extras"].split(",")) <= set(extras), line[0]
    for extra in extras:
        assert f"`{extra}`" in text or f"`[{extra}]`" in text, f"{document} does not say what the {extra} extra is for"


def test_getting_started_is_in_the_site_nav_and_linked_from_the_readme():
    assert "getting-started.md" in (ROOT / "mkdocs.yml").read_text()
    assert "(docs/getting-started.md)" in (ROOT / "README.md").read_text()
    assert (DOCS / "getting-started.md").exists()
