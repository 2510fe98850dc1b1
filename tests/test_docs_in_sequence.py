"""A reader follows one document after another against the same Redis: the README's tour,
Getting started and the HTTP API page each run after the others, in one namespace, in both
orders. Each test of test_readme.py and test_http_readme.py runs one document on a fresh
namespace; this one finds what they cannot: a request id or an account that two documents
share (a reused request id with other content is rejected as idempotency_conflict), or a
command whose output depends on what ran before."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tests.conftest import environment, worker_running
from tests.documents import DOCUMENTS, FENCE, name
from tests.test_http_readme import run_the_page
from tests.test_readme import EXAMPLES, SESSIONS, run_example, type_session

TOUR = ["README.md", "docs/getting-started.md", "docs/http-api.md"]


def follow(document: str, settings, cwd) -> None:
    """A document's examples, as its reader runs them: the console lines, then (with a
    worker running, as the page asks) its Python examples and its HTTP transcripts."""
    env = {**os.environ, **environment(settings)}
    type_session(SESSIONS.get(document, []), env, cwd)
    with worker_running(settings, consumer="reader"):
        for example in EXAMPLES:
            if example.document == document:
                run_example(example, env, cwd)
        if document == "docs/http-api.md":
            run_the_page(settings, cwd)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (make test installs it)")
@pytest.mark.parametrize("order", [TOUR, TOUR[::-1]], ids=["readme-first", "http-api-first"])
def test_the_documents_run_one_after_another_in_one_namespace(order, settings, client, tmp_path):
    for document in order:
        (tmp_path / name_dir(document)).mkdir()
        follow(document, settings, tmp_path / name_dir(document))


def name_dir(document: str) -> str:
    return document.replace("/", "-")


# Request ids: the idempotency keys of every example, one document's never another's.

REQUEST_ID = re.compile(r"""--request-id (?P<a>[\w.-]+)|"request_id": "(?P<b>[\w.-]+)"|Idempotency-Key: (?P<c>[\w.-]+)""")


def request_ids(text: str) -> set[str]:
    return {next(filter(None, m.groups())) for block in FENCE.finditer(text) for m in REQUEST_ID.finditer(block["body"])}


def test_no_two_documents_use_the_same_request_id():
    seen: dict[str, str] = {}
    for path in DOCUMENTS:
        for request_id in request_ids(path.read_text()):
            assert request_id not in seen, f"{request_id} is in {seen.get(request_id)} and {name(path)}"
            seen[request_id] = name(path)
    assert {"call-1", "call-42", "first-sms", "order-42"} <= set(seen)
