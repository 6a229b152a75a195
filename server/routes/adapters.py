"""/v1/adapters: the tenant's LoRA adapters (list, show, upload or register, delete, load, unload, loss plot),
plus vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter bodies. A tenant only ever sees its own."""

import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Path as PathParam, Request
from fastapi.responses import FileResponse, PlainTextResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from adapters.archive import extract_adapter_archive
from server.hotswap.service import AdapterService
from server.deps import CurrentTenant, ReadyServices
from server.errors import Forbidden, InvalidRequest
from server.schemas import ErrorResponse

router = APIRouter(tags=["models"])
# Beyond what server.openapi derives from the dependencies (400, 401, 403, 404, 413, 503): a change may
# clash with the adapter's state (409) or find the adapter invalid (422).
_ERRORS = {code: {"model": ErrorResponse} for code in (409, 422)}
AdapterName = Annotated[str, PathParam(min_length=1, max_length=63)]


class AdapterRegister(BaseModel):
    name: str = Field(min_length=1, max_length=63)
    path: str = Field(min_length=1, description="a server-side adapter dir under adapters.allowed_paths")
    overwrite: bool = False


class LoadLoraAdapter(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=63)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = Field(False, description="replace an adapter of the same name instead of refusing")


class UnloadLoraAdapter(BaseModel):
    lora_name: str = Field(min_length=1, max_length=63)


def _adapters(services) -> AdapterService:
    return services.adapters


@router.get("/v1/adapters")
def list_adapters(tenant: CurrentTenant, services: ReadyServices) -> dict:
    """The tenant's adapters with residency ("gpu" = on the model's device), pinning, training metrics and usage."""
    return {"object": "list", "data": _adapters(services).views(tenant.id, default=tenant.default_adapter)}


@router.get("/v1/adapters/{name}")
def get_adapter(name: AdapterName, tenant: CurrentTenant, services: ReadyServices) -> dict:
    return _adapters(services).view(tenant.id, name, default=tenant.default_adapter)


@router.get("/v1/adapters/{name}/loss.png", response_class=FileResponse)
def adapter_loss_plot(name: AdapterName, tenant: CurrentTenant, services: ReadyServices) -> FileResponse:
    return FileResponse(_adapters(services).loss_plot(tenant.id, name), media_type="image/png")


@router.post("/v1/adapters", status_code=201, responses=_ERRORS, openapi_extra={"requestBody": {
    "required": True,
    "content": {
        # read by hand (not a FastAPI body), so described here for clients and fuzzers
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["name", "file"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 63},
                "file": {"type": "string", "format": "binary",
                         "description": "the adapter dir as a .tar.gz, .tgz, .tar or .zip archive"},
                "overwrite": {"type": "boolean", "default": False},
            },
        }},
        "application/json": {"schema": AdapterRegister.model_json_schema()},
    },
}})
async def add_adapter(request: Request, tenant: CurrentTenant, services: ReadyServices) -> dict:
    """Add (or with ``overwrite`` replace) an adapter, validated before anything changes.

    multipart/form-data: ``name``, ``file`` (the adapter dir as .tar.gz/.tgz/.tar/.zip), optional ``overwrite``;
    or JSON ``{"name", "path", "overwrite"}`` for a server-side dir under ``adapters.allowed_paths``.
    """
    adapters = _adapters(services)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        name, upload = form.get("name"), form.get("file")
        overwrite = str(form.get("overwrite", "false")).lower() in ("1", "true", "yes")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("name: the adapter name is required", param="name")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("file: upload the adapter dir as an archive in the 'file' field", param="file")
        adapters.check_can_register(name)  # before anything is written or unpacked
        return await run_in_threadpool(_register_upload, adapters, services.settings, tenant.id, name, upload, overwrite)
    try:
        body = AdapterRegister.model_validate_json(await request.body())
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or None
        raise InvalidRequest(
            f"invalid adapter registration body: {field + ': ' if field else ''}{problem['msg']}; "
            'send JSON {"name", "path", "overwrite"} or a multipart upload',
            param=field or "body",
        ) from error
    source = _allowed_path(services.settings, body.path)
    return await run_in_threadpool(adapters.register, tenant.id, body.name, source, overwrite=body.overwrite)


@router.delete("/v1/adapters/{name}", responses=_ERRORS)
async def delete_adapter(name: AdapterName, tenant: CurrentTenant, services: ReadyServices) -> dict:
    """Remove the adapter from disk; requests already running with it finish on it."""
    await run_in_threadpool(_adapters(services).delete, tenant.id, name)
    return {"id": name, "object": "adapter", "deleted": True}


@router.post("/v1/adapters/{name}/load", responses=_ERRORS)
async def load_adapter(name: AdapterName, tenant: CurrentTenant, services: ReadyServices) -> dict:
    adapters = _adapters(services)
    await run_in_threadpool(adapters.load, tenant.id, name)
    return adapters.view(tenant.id, name, default=tenant.default_adapter)


@router.post("/v1/adapters/{name}/unload", responses=_ERRORS)
async def unload_adapter(name: AdapterName, tenant: CurrentTenant, services: ReadyServices) -> dict:
    """Take the adapter out of device and host memory (it stays on disk and loads again when asked for)."""
    adapters = _adapters(services)
    await run_in_threadpool(adapters.unload, tenant.id, name)
    return adapters.view(tenant.id, name, default=tenant.default_adapter)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
async def vllm_load_lora_adapter(body: LoadLoraAdapter, tenant: CurrentTenant, services: ReadyServices) -> str:
    """vLLM's call: add the server-side dir ``lora_path`` as ``lora_name`` and load it. A name already loaded is
    a 400 unless ``load_inplace``. The copy is kept in the tenant's registry: it survives a restart."""
    source = _allowed_path(services.settings, body.lora_path)
    await run_in_threadpool(_adapters(services).load_lora_adapter, tenant.id, body.lora_name, source,
                            load_inplace=body.load_inplace)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
async def vllm_unload_lora_adapter(body: UnloadLoraAdapter, tenant: CurrentTenant, services: ReadyServices) -> str:
    """vLLM's call: ``lora_name`` (added by load_lora_adapter) stops being listed and served; 404 when unknown."""
    await run_in_threadpool(_adapters(services).unload_lora_adapter, tenant.id, body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


def _allowed_path(settings, path: str) -> Path:
    """Raises: InvalidRequest for an unusable path; Forbidden unless it resolves inside adapters.allowed_paths,
    and always for a path inside the data directory (or holding it), whatever allowed_paths says: registering
    from there would copy another tenant's adapter. Links are resolved first, so none leads around this."""
    if not path or "\x00" in path:
        raise InvalidRequest(f"adapter path {path!r} is empty or contains a NUL character")
    source = Path(path).expanduser().resolve()
    data_dir = Path(settings.data_dir).expanduser().resolve()
    if source == data_dir or source.is_relative_to(data_dir) or data_dir.is_relative_to(source):
        raise Forbidden(
            f"path {path!r} is inside the server's data directory, where no adapter may be registered from",
            hint="upload the adapter as an archive instead",
        )
    allowed = [Path(root).expanduser().resolve() for root in settings.adapters.allowed_paths]
    if not any(source == root or source.is_relative_to(root) for root in allowed):
        raise Forbidden(
            f"path {path!r} is not under adapters.allowed_paths",
            hint="upload the adapter as an archive, or ask the admin to allow its directory",
        )
    return source


def _register_upload(adapters: AdapterService, settings, tenant: str, name: str, upload, overwrite: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix=".upload-", dir=settings.data_dir) as scratch:
        scratch = Path(scratch)
        archive = scratch / "archive"
        with open(archive, "wb") as out:
            upload.file.seek(0)
            while block := upload.file.read(1 << 20):
                out.write(block)
        unpacked = scratch / "unpacked"
        unpacked.mkdir()
        source = extract_adapter_archive(
            archive, upload.filename or "upload", unpacked, max_bytes=settings.adapters.max_upload_bytes,
            check_header=adapters.check_upload_header(name),
        )
        return adapters.register(tenant, name, source, overwrite=overwrite)
