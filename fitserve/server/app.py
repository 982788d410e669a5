"""The FastAPI app: routes, authentication, lifecycle. Protocol details live in serving_*.py."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from fitserve.engine.async_engine import AsyncLLMEngine
from fitserve.server import serving_admin
from fitserve.server.errors import APIError, install_error_handlers, validation_error_to_api_error
from fitserve.server.metrics import ServerMetrics
from fitserve.server.openapi import openapi_document
from fitserve.server.protocol import ChatCompletionRequest, CompletionRequest
from fitserve.server.serving_chat import create_chat_completion
from fitserve.server.serving_common import ServerSettings, ServerState, check_model_name, read_body
from fitserve.server.serving_completions import create_completion


def _state(request: Request) -> ServerState:
    return request.app.state.fitserve


def require_api_key(request: Request) -> None:
    """When the server has keys, every /v1 call must present one as a bearer token. A key from
    --api-keys-file also names the request's tenant (`request.state.tenant`), which the
    scheduler shares service between."""
    settings = _state(request).settings
    expected, api_keys = settings.api_key, settings.api_keys
    if expected is None and api_keys is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    # HTTP headers arrive as bytes that Starlette decodes as latin-1; encoding back gives the
    # bytes the client sent, so a non-ASCII key sent as UTF-8 matches the key's UTF-8 bytes.
    presented_bytes = presented.strip().encode("latin-1")
    tenant = (api_keys.tenant_of(presented_bytes.decode("utf-8", errors="replace"))
              if api_keys is not None else None)
    if tenant is not None:
        request.state.tenant = tenant
        return
    # Constant-time comparison, so response timing does not leak the key byte by byte.
    if expected is None or not hmac.compare_digest(presented_bytes, expected.encode("utf-8")):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


async def _parse_body(request: Request, schema: type[BaseModel]) -> Any:
    raw_body = await read_body(request, _state(request).settings.max_request_body_bytes)
    if not raw_body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return schema.model_validate_json(raw_body)
    except ValidationError as error:
        raise validation_error_to_api_error(error) from error


def _as_response(result: Any) -> Response:
    return result if isinstance(result, Response) else JSONResponse(result)


def build_app(async_engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    """An app serving `async_engine`; the engine thread runs for as long as the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            # By now uvicorn has stopped accepting and drained (or cancelled) in-flight requests.
            await async_engine.shutdown()

    app = FastAPI(title="fitserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.fitserve = ServerState(async_engine, settings, ServerMetrics(async_engine.get_stats))
    install_error_handlers(app)
    authorized = [Depends(require_api_key)]

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request) -> Response:
        body = await _parse_body(request, CompletionRequest)
        return _as_response(await create_completion(_state(request), body, request))

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request) -> Response:
        body = await _parse_body(request, ChatCompletionRequest)
        return _as_response(await create_chat_completion(_state(request), body, request))

    def model_card(state: ServerState, name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created_time, "owned_by": "fitserve",
                "root": state.settings.model_path or name, "max_model_len": state.async_engine.max_model_len}

    @app.get("/v1/models", dependencies=authorized)
    async def models(request: Request) -> Response:
        state = _state(request)
        return JSONResponse({"object": "list",
                             "data": [model_card(state, name) for name in state.settings.served_model_names]})

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def model(name: str, request: Request) -> Response:
        state = _state(request)
        check_model_name(state, name)
        return JSONResponse(model_card(state, name))

    @app.get("/v1/admin/weight-memory", dependencies=authorized)
    async def get_weight_memory(request: Request) -> Response:
        return JSONResponse(serving_admin.weight_memory(_state(request)))

    @app.post("/v1/admin/weight-memory", dependencies=authorized)
    async def post_weight_memory(request: Request) -> Response:
        state = _state(request)
        raw_body = await read_body(request, state.settings.max_request_body_bytes)
        return JSONResponse(await serving_admin.set_weight_memory(state, raw_body))

    @app.get("/health")
    async def health(request: Request) -> Response:
        if not _state(request).async_engine.is_running:
            raise APIError(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    document: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not document:
            document.update(openapi_document(app, with_api_key=settings.api_key is not None))
        return document

    app.openapi = openapi  # type: ignore[method-assign]
    return app
