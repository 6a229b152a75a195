"""The OpenAPI document says what the server does: the statuses each route answers, 400 (not FastAPI's 422)
for validation, Retry-After on 429/503, the limits the server enforces as schema bounds, the multipart
adapter upload. tests/server/test_schema_fuzz.py checks the same against generated requests."""

import re

import pytest

from adapters.registry import InvalidAdapter, validate_adapter_name
from server.app import create_app
from server.openapi import ADAPTER_NAME_PATTERN
from server.settings import ServerSettings
from tests.server.conftest import assert_error, auth

DOCUMENT = create_app(ServerSettings(data_dir="unused", server={"max_k": 50})).openapi()
OPERATIONS = {(path, method): operation for path, methods in DOCUMENT["paths"].items()
              for method, operation in methods.items()}
TENANT_ROUTES = [key for key, operation in OPERATIONS.items()
                 if any(p["name"] == "X-Lorag-Tenant" for p in operation.get("parameters", []))]


def test_validation_is_declared_as_the_400_it_is_and_422_only_where_an_adapter_is_refused():
    assert "HTTPValidationError" not in DOCUMENT["components"]["schemas"]
    for (path, method), operation in OPERATIONS.items():
        responses = operation["responses"]
        if operation.get("parameters") or operation.get("requestBody"):
            assert "400" in responses, (method, path)
        if "422" in responses:
            assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
            assert "adapter" in path or path == "/v1/admin/tenants", (method, path)


def test_tenant_routes_and_metrics_declare_401_and_403_and_readiness_503_with_retry_after():
    assert len(TENANT_ROUTES) > 15
    for key in TENANT_ROUTES:
        responses = OPERATIONS[key]["responses"]
        assert {"401", "403", "404", "503"} <= set(responses), key
        assert "Retry-After" in responses["503"]["headers"], key
    assert {"401", "403"} <= set(OPERATIONS[("/metrics", "get")]["responses"])
    chat = OPERATIONS[("/v1/chat/completions", "post")]["responses"]
    assert {"413", "429", "503", "504"} <= set(chat) and "Retry-After" in chat["429"]["headers"]
    assert "Retry-After" not in OPERATIONS[("/readyz", "get")]["responses"]["503"].get("headers", {})


def test_retrieval_k_is_bounded_in_the_schema_and_by_the_server_alike(client, corpus):
    schemas = DOCUMENT["components"]["schemas"]
    for name in ("RetrieveRequest", "RetrievalOptions"):
        integer = next(b for b in schemas[name]["properties"]["k"]["anyOf"] if b.get("type") == "integer")
        assert integer["maximum"] == 50 and integer["minimum"] == 1
    assert client.post("/v1/retrieve", json={"query": "sensor accuracy", "k": 50},
                       headers=auth(corpus.acme_key)).status_code == 200
    over = client.post("/v1/retrieve", json={"query": "sensor accuracy", "k": 51}, headers=auth(corpus.acme_key))
    assert_error(over, 400, param="k")


def test_the_adapter_upload_body_is_described():
    body = OPERATIONS[("/v1/adapters", "post")]["requestBody"]["content"]
    multipart = body["multipart/form-data"]["schema"]
    assert set(multipart["required"]) == {"name", "file"} and multipart["properties"]["file"]["format"] == "binary"
    assert set(body["application/json"]["schema"]["required"]) == {"name", "path"}


@pytest.mark.parametrize("name", ["acme", "a", "v1.2", "a-b_c", "A9", "x.", "a" * 63, "", ".a", "a..b", "a/b",
                                  "a" * 64, "-a", "a b", "é"])
def test_the_adapter_name_pattern_is_the_registry_rule(name):
    try:
        validate_adapter_name(name)
        valid = True
    except InvalidAdapter:
        valid = False
    assert valid == (bool(re.fullmatch(ADAPTER_NAME_PATTERN, name)) and 1 <= len(name) <= 63)
