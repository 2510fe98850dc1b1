"""The ACL roles of deploy/users.acl in a real redis-server, for the ACL tests. Only the
passwords are swapped for test ones; every rule is the shipped file's, verbatim. The tests
may add users of their own (a superuser that sets the scene, a producer made by the
documented recipe); the roles under test are never changed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from charging.connection import connect
from charging.keys import Keys
from charging.settings import Settings
from charging.tools.redis_server import RedisServer

ACL_FILE = Path(__file__).resolve().parent.parent / "deploy" / "users.acl"
NAMESPACE = "ch"  # the key patterns of the shipped file
KEYS = Keys(NAMESPACE, 0)
ROLES = ("producer", "authorizer", "gateway", "worker", "maintainer", "admin")
ROOT = "root"  # test-only: sets the scene and reads what the roles may not
ROOT_LINE = f"user {ROOT} on >test-{ROOT}-secret ~* &* +@all"


def password_of(user: str) -> str:
    return f"test-{user}-secret"


def shipped_users() -> dict[str, str]:
    """user name -> its line, as shipped."""
    return {line.split()[1]: line for line in ACL_FILE.read_text().splitlines() if line.strip()}


def with_test_password(line: str) -> str:
    return re.sub(r"^user (\S+) on #[0-9a-f]{64} ", lambda m: f"user {m[1]} on >{password_of(m[1])} ", line)


@contextmanager
def acl_server(directory: Path, extra_users: tuple[str, ...] = ()) -> Iterator[RedisServer]:
    """A redis-server that loads the shipped ACL file (test passwords), the test superuser
    and extra_users (lines in the file's own syntax, '#<sha256>' passwords swapped too)."""
    lines = [with_test_password(line) for line in (*shipped_users().values(), *extra_users)]
    acl = directory / "users.acl"
    acl.write_text("\n".join([*lines, ROOT_LINE]) + "\n")
    with RedisServer(directory / "data", extra_args=("--aclfile", str(acl)),
                     credentials=(ROOT, password_of(ROOT))) as server:
        yield server


def role(server: RedisServer, user: str, **changes) -> Settings:
    """The settings a process of this role runs with. A producer waits on the reply stream
    its ACL user may read: the one named for the user (docs/security.md)."""
    settings = Settings(redis_url=f"redis://{user}:{password_of(user)}@127.0.0.1:{server.port}/0",
                        namespace=NAMESPACE, reclaim_idle_ms=500, maintenance_interval_s=0.2, block_ms=200,
                        producer_id=user)
    return settings.model_copy(update=changes)


def root(server: RedisServer) -> redis.Redis:
    """The test superuser: loads the library and sets up what a scenario starts from."""
    return connect(role(server, ROOT))


def denied(call) -> bool:
    """True when Redis answers NOPERM (redis-py raises NoPermissionError for it)."""
    try:
        call()
    except redis.exceptions.NoPermissionError as refused:
        return "no permissions" in str(refused)
    return False
