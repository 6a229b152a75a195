"""Schemathesis against the app's own OpenAPI document, with every built-in check: no 5xx, only declared
statuses, content types, headers and bodies, schema-invalid data refused (400) and schema-valid data not
refused for its shape, plus the stateful phase that follows the document's links (create -> read -> delete).

Bounded: a few examples per operation and mode, a few short stateful scenarios. A fresh data dir, since the
stateful phase deletes what it creates. ``LORAG_FUZZ_EXAMPLES`` raises the count for a longer run."""

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server.app import create_app
from server.background import serving
from server.settings import ServerSettings
from tests.server.conftest import ADMIN_KEY, BETA_TEXT

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("LORAG_FUZZ_EXAMPLES", "4"))
# The document does not depend on state, so an app that never starts serves to list the operations.
DOCUMENT = create_app(ServerSettings(data_dir="unused")).openapi()
CASES = [
    (path, method, mode)
    for path, methods in DOCUMENT["paths"].items()
    for method, operation in methods.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    # an operation without inputs has no invalid request to make
    if mode is GenerationMode.POSITIVE or operation.get("parameters") or operation.get("requestBody")
]
# Schema-valid requests the server may still refuse for what no schema can say: an adapter archive whose
# config or weights are invalid (422, the message names the problem). Every other check still runs on them.
CONTENT_CHECKED = {("/v1/adapters", "post"): {422}}
FIGURES: Counter = Counter()  # cases and failures, printed at the end (benchmarks/RESULTS.md records them)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, corpus, extractive_generator):
    """(schema read from the app served by uvicorn, tenant key): one tenant with one document, real retrieval."""
    from ingest.pipeline import ingest_paths
    from retrieval.service import RetrievalService
    from server.tenants import TenantRegistry

    data_dir = tmp_path_factory.mktemp("fuzz-data")
    docs = tmp_path_factory.mktemp("fuzz-docs")
    (docs / "memo.txt").write_text(BETA_TEXT)
    settings = ServerSettings(data_dir=data_dir, server={"admin_key": ADMIN_KEY})
    retrieval = RetrievalService(settings, embedder=corpus.retrieval.embedder)
    assert ingest_paths([docs], tenant="fuzz", settings=settings, embedder=retrieval.embedder).failed == 0
    _, key = TenantRegistry(data_dir).add("fuzz")
    app = create_app(settings, retrieval=retrieval, generator=extractive_generator)
    with serving(app) as base_url:
        yield schemathesis.openapi.from_url(f"{base_url}/openapi.json"), key
    print(f"\nschema fuzz: {FIGURES['cases']} cases, {FIGURES['failures']} failures, "
          f"{FIGURES['stateful']} stateful scenarios, every built-in check on each response")


def _headers(path: str, tenant_key: str) -> dict:
    admin = path.startswith("/v1/admin") or path == "/metrics"
    return {"Authorization": f"Bearer {ADMIN_KEY if admin else tenant_key}"}


@pytest.mark.parametrize(("path", "method", "mode"), CASES)
def test_generated_requests_pass_every_check(fuzzed, path, method, mode):
    schema, key = fuzzed
    operation = schema[path][method.upper()]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case):
        FIGURES["cases"] += 1
        content_checked = CONTENT_CHECKED.get((path, method), set())
        try:
            response = case.call_and_validate(
                headers=_headers(path, key),
                excluded_checks=[positive_data_acceptance] if content_checked else None,
            )
            if content_checked and mode is GenerationMode.POSITIVE:
                assert response.status_code < 400 or response.status_code in content_checked | {401, 403, 404, 409}, (
                    f"{method} {path}: a schema-valid request got {response.status_code} {response.text}")
        except Exception:
            FIGURES["failures"] += 1
            raise

    check()


def test_stateful_links_create_read_delete(fuzzed):
    schema, key = fuzzed

    class Links(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": _headers(case.path, key)}

        def setup(self):
            FIGURES["stateful"] += 1

    Links.run(settings=settings(max_examples=EXAMPLES * 2, stateful_step_count=4, deadline=None,
                                suppress_health_check=list(HealthCheck), derandomize=True))
