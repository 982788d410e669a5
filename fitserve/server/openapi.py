"""GET /openapi.json: the API as it is, with the request schemas the server validates against.

The routes read their bodies themselves (to bound their size before parsing and to answer in
OpenAI's error format), so FastAPI cannot see the body models; the document is completed here
from the very pydantic models the routes validate with, so it cannot drift from them. Tools
such as schemathesis generate requests from it (tests/server/test_openapi_fuzz.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from fitserve import __version__
from fitserve.server.protocol import ChatCompletionRequest, CompletionRequest
from fitserve.server.serving_admin import WEIGHT_MEMORY_BODY

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_ERRORS = {
    "400": "invalid parameters, unknown fields, invalid JSON, a prompt that does not fit the context, or a "
           "weight-memory budget out of range (or a model whose weights cannot be resized)",
    "401": "missing or wrong API key (when the server has one)",
    "404": "unknown model",
    "413": "body larger than --max-request-body-bytes",
    "503": "the server is shutting down",
}
_BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


def _responses(success: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    responses = {"200": success}
    for status in errors:
        responses[status] = {"description": _ERRORS[status],
                             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return responses


def openapi_document(app: FastAPI, with_api_key: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s routes, request bodies included."""
    document = get_openapi(title="fitserve", version=__version__, routes=app.routes,
                           description="OpenAI-compatible API of a fitserve server")
    _, definitions = models_json_schema([(model, "validation") for model in _BODIES.values()],
                                        ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(definitions["$defs"])
    schemas["Error"] = _ERROR_SCHEMA
    generation = {"description": "the completion; with stream: true, server-sent events ending with data: [DONE]",
                  "content": {"application/json": {"schema": {"type": "object"}},
                              "text/event-stream": {"schema": {"type": "string"}}}}
    for path, model in _BODIES.items():
        operation = document["paths"][path]["post"]
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        operation["responses"] = _responses(generation, ["400", "401", "404", "413", "503"])
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    document["paths"]["/v1/models"]["get"]["responses"] = _responses(json_ok, ["401"])
    document["paths"]["/v1/models/{name}"]["get"]["responses"] = _responses(json_ok, ["401", "404"])
    document["paths"]["/health"]["get"]["responses"] = _responses(json_ok, ["503"])
    admin = document["paths"]["/v1/admin/weight-memory"]
    admin["get"]["responses"] = _responses(json_ok, ["400", "401"])
    admin["post"]["requestBody"] = {"required": True, "content": {"application/json": {"schema": WEIGHT_MEMORY_BODY}}}
    admin["post"]["responses"] = _responses(json_ok, ["400", "401", "413", "503"])
    document["paths"]["/metrics"]["get"]["responses"] = {"200": {
        "description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}
    if with_api_key:
        schemas_security = document["components"].setdefault("securitySchemes", {})
        schemas_security["bearer"] = {"type": "http", "scheme": "bearer"}
        for path, operations in document["paths"].items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    return document
