"""The OpenAPI document, made to say what the server does: the error statuses each route can answer are
derived from the dependencies it runs (auth, tenant, readiness) and from the limits every request passes
(validation 400, body size 413), FastAPI's 422 is replaced by the 400 the error handlers really send, and
limits that come from settings (``retrieval.k``) appear as schema bounds.

FastAPI only knows about statuses a route declares by hand; deriving them here keeps the document true when a
route gains a dependency, where a hand-kept list per route would drift.
"""

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from core.datadir import TENANT_NAME_PATTERN
from server import deps

_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
}
_DESCRIPTIONS = {
    400: "invalid request: a field breaks the schema or a server limit (named in error.param)",
    401: "missing or invalid API key",
    403: "the key may not do this: a tenant key naming another tenant, or an admin-only route",
    404: "not found (for the admin key: no such tenant in X-Lorag-Tenant)",
    413: "request body over server.max_json_bytes (JSON) or server.max_body_bytes (uploads)",
    429: "the tenant is over its own limit; retry after Retry-After",
    503: "not ready yet, or no capacity now; retry after Retry-After",
}
_BODY_METHODS = {"POST", "PUT", "PATCH"}
# Component schemas whose ``k`` is capped by server.max_k.
_K_SCHEMAS = ("RetrievalOptions", "RetrieveRequest")
# adapters.registry's rule for adapter names (1-63 letters, digits, '.', '-', '_', starting with a letter or
# digit, no '..'), written without a lookahead so that generators of example data can follow it.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"
_ADAPTER_NAME = {"pattern": ADAPTER_NAME_PATTERN, "minLength": 1, "maxLength": 63}
# Request fields the server checks beyond their pydantic type, as (component schema, property) -> bounds.
_BOUNDS = {
    ("TenantCreate", "id"): {"pattern": TENANT_NAME_PATTERN},  # core.datadir.validate_tenant_name
    ("TenantCreate", "default_adapter"): _ADAPTER_NAME,
    ("LoadLoraAdapter", "lora_name"): _ADAPTER_NAME,
    ("UnloadLoraAdapter", "lora_name"): _ADAPTER_NAME,
    ("Body_upload_documents_v1_documents_post", "files"): {"minItems": 1},  # an upload names at least one file
}
# Statuses a route answers that no dependency explains: (path, method) -> {status: description}.
_OWN_STATUSES = {
    ("/v1/admin/tenants", "post"): {422: "default_adapter is not a name any adapter could have"},
    ("/v1/adapters", "post"): {422: "the adapter is invalid: its name, config or weights (the message says which)"},
}
# OpenAPI links: what a create answers names the resource the other operations take (clients and the
# stateful fuzz phase follow them: create -> read -> delete).
_DOCUMENT = {"document_id": "$response.body#/data/0/document_id"}
_TENANT = {"tenant_id": "$response.body#/tenant/id"}
_LINKS = {
    ("/v1/documents", "post", "200"): {
        "GetDocument": ("/v1/documents/{document_id}", "get", _DOCUMENT),
        "GetDocumentFile": ("/v1/documents/{document_id}/file", "get", _DOCUMENT),
        "DeleteDocument": ("/v1/documents/{document_id}", "delete", _DOCUMENT),
    },
    ("/v1/admin/tenants", "post", "201"): {
        "RotateTenantKey": ("/v1/admin/tenants/{tenant_id}/rotate-key", "post", _TENANT),
        "DeleteTenant": ("/v1/admin/tenants/{tenant_id}", "delete", _TENANT),
    },
}


def install_openapi(app: FastAPI, routers, *, max_k: int) -> None:
    """Serve the corrected document at /openapi.json (built once, on first request). ``routers``: the
    APIRouters the app includes (without prefixes), whose routes carry the dependencies statuses come from."""
    routes = [route for router in routers for route in router.routes]

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes, tags=app.openapi_tags)
            app.openapi_schema = describe(document, routes, max_k=max_k)
        return app.openapi_schema

    app.openapi = openapi


def describe(document: dict, routes, *, max_k: int) -> dict:
    """Fix ``document`` in place (and return it): error statuses per operation, 422 gone, k bounded."""
    paths = document.get("paths", {})
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        statuses = _error_statuses(route)
        for method in route.methods:
            operation = paths.get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if "HTTPValidationError" in str(responses.get("422")):  # FastAPI's; validation answers 400
                del responses["422"]
            own = _OWN_STATUSES.get((route.path_format, method.lower()), {})
            wanted = statuses | ({413} if method in _BODY_METHODS else set()) | set(own)
            if operation.get("parameters") or operation.get("requestBody"):
                wanted.add(400)  # the validation error handler's answer
            for status in sorted(wanted):
                description = own.get(status) or _DESCRIPTIONS[status]
                declared = responses.setdefault(str(status), {"description": description})
                declared.setdefault("content", {"application/json": {"schema": _ERROR}})
            for status, declared in responses.items():
                # A plain-text route (vLLM's adapter API answers success as text) still answers errors as JSON
                # error objects; FastAPI files them under the route's own media type.
                content = declared.get("content", {})
                if not status.startswith("2") and content.get("text/plain", {}).get("schema") == _ERROR:
                    declared["content"] = {"application/json": content.pop("text/plain")}
            _bound_adapter_names(route.path_format, operation)
            for status in ("429", "503"):  # the errors, not /readyz's 503 status body
                if responses.get(status, {}).get("content", {}).get("application/json", {}).get("schema") == _ERROR:
                    responses[status].setdefault("headers", {}).update(_RETRY_AFTER)
    for (path, method, status), links in _LINKS.items():
        response = paths.get(path, {}).get(method, {}).get("responses", {}).get(status)
        if response is None:
            continue
        for name, (target, target_method, parameters) in links.items():
            operation_id = paths.get(target, {}).get(target_method, {}).get("operationId")
            if operation_id is not None:
                response.setdefault("links", {})[name] = {"operationId": operation_id, "parameters": parameters}
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # only the 422s referred to them
        schemas.pop(name, None)
    for (name, field), bounds in _BOUNDS.items():
        target = schemas.get(name, {}).get("properties", {}).get(field)
        if target is not None:
            for branch in target.get("anyOf", [target]):
                if branch.get("type") == _branch_type(bounds):
                    branch.update(bounds)
    for name in _K_SCHEMAS:
        k = schemas.get(name, {}).get("properties", {}).get("k")
        if k is not None:
            for branch in k.get("anyOf", [k]):
                if branch.get("type") == "integer":
                    branch["maximum"] = max_k
    return document


def _branch_type(bounds: dict) -> str:
    return "array" if "minItems" in bounds else "string"


def _bound_adapter_names(path: str, operation: dict) -> None:
    """The adapter name in /v1/adapters/{name} paths and in the body of POST /v1/adapters."""
    if not path.startswith("/v1/adapters"):
        return
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "path" and parameter.get("name") == "name":
            parameter.setdefault("schema", {}).update(_ADAPTER_NAME)
    for media in operation.get("requestBody", {}).get("content", {}).values():
        name = media.get("schema", {}).get("properties", {}).get("name")
        if name is not None:
            name.update(_ADAPTER_NAME)


def _error_statuses(route: APIRoute) -> set[int]:
    calls = _dependency_calls(route.dependant)
    statuses: set[int] = set()
    if calls & {deps.get_principal, deps.require_metrics_access}:
        statuses.add(401)
    if calls & {deps.get_tenant, deps.require_admin, deps.require_metrics_access}:
        statuses.add(403)
    if deps.get_tenant in calls:
        statuses.add(404)
    if deps.get_ready_services in calls:
        statuses.add(503)
    return statuses


def _dependency_calls(dependant) -> set:
    calls = set()
    for sub in dependant.dependencies:
        calls.add(sub.call)
        calls |= _dependency_calls(sub)
    return calls
