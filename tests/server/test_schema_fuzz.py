"""Schemathesis against the app's own OpenAPI schema: generated requests never get a 5xx, and every
4xx is the one OpenAI error shape."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from server.app import create_app
from server.settings import ServerSettings
from tests.server.conftest import auth

pytestmark = pytest.mark.slow

# The schema does not depend on state, so an app that never starts serves to read it at collection.
SCHEMA = schemathesis.openapi.from_dict(create_app(ServerSettings(data_dir="unused")).openapi())
OPERATIONS = [(path, method) for path, methods in SCHEMA.raw_schema["paths"].items() for method in methods]


@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_generated_requests_get_no_server_error(client, corpus, path, method):
    operation = SCHEMA[path][method.upper()]

    @given(case=operation.as_strategy())
    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case):
        request = case.as_transport_kwargs(base_url="http://testserver")
        request.pop("cookies", None)
        request["headers"].pop("X-Lorag-Tenant", None)  # a tenant key naming any other tenant is a plain 403
        request["headers"]["Authorization"] = auth(corpus.acme_key)["Authorization"]
        response = client.request(**request)
        assert response.status_code < 500, f"{method} {request['url']}: {response.status_code} {response.text}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    check()
