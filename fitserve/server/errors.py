"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

Clients (the official `openai` package, LangChain, lm-eval) turn this shape into typed
exceptions, and people read the message, so every message says what was wrong and, where
it helps, what the limits are. Anything a client can send must end here as a 4xx; a 500
means a bug in fitserve.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}

# What a field of union type accepts, in words: pydantic would otherwise report one error
# per union member, which reads as noise.
_UNION_FIELD_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...}); "
    "images and audio are not supported",
}


class APIError(Exception):
    """An error to send to the client as-is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    if error.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), error.status, headers=headers)


def _is_union_tag(part: object) -> bool:
    # pydantic names the union member it tried, e.g. "list[int]", "str" or "TextContentPart".
    return isinstance(part, str) and bool(
        re.fullmatch(r"[a-z]+\[.*\]|str|int|float|bool|none|[A-Z]\w*", part)
    )


def validation_error_to_api_error(error: ValidationError) -> APIError:
    """One readable 400 from pydantic's error list: names the field, says what it must be."""
    messages: list[str] = []
    first_param: str | None = None
    seen_params: set[str] = set()
    for item in error.errors(include_url=False):
        location = item["loc"]
        kind = item["type"]
        if kind == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {item['msg'].removeprefix('Invalid JSON: ')}")
        in_union = any(_is_union_tag(part) for part in location)
        if in_union:
            # Report the union field itself, not each member's inner complaint.
            location = location[: next(i for i, part in enumerate(location) if _is_union_tag(part))]
        field_path = ".".join(str(part) for part in location)
        param = field_path or None
        if param in seen_params:
            continue
        if kind == "extra_forbidden" and not in_union:
            text = f"unknown field '{field_path}': it is not an OpenAI parameter this server accepts"
        elif in_union:
            last_name = str(location[-1]) if location else ""
            hint = _UNION_FIELD_HINTS.get(last_name, "has the wrong type")
            text = f"{field_path} {hint}"
        elif kind == "missing":
            text = f"'{field_path}' is required"
        elif kind == "model_type" and not field_path:
            text = "the body must be a JSON object"
        else:
            message = item["msg"].removeprefix("Value error, ")
            given = item.get("input")
            suffix = f" (got {given!r})" if field_path and not isinstance(given, (dict, list)) else ""
            text = f"{field_path}: {message}{suffix}" if field_path else message
        if param is not None:
            seen_params.add(param)
        first_param = first_param or param
        messages.append(text)
    return APIError(400, "; ".join(messages[:5]) or "invalid request", param=first_param)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error path of the app answer in OpenAI's format."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(ValidationError)
    async def _validation_error(_: Request, error: ValidationError) -> JSONResponse:
        return error_response(validation_error_to_api_error(error))

    @app.exception_handler(RequestValidationError)
    async def _request_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, f"invalid request: {error.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see GET /v1/models and POST /v1/completions"
        elif error.status_code == 405:
            # Starlette names the allowed methods in the Allow header, which HTTP requires on a 405.
            allowed = (error.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {request.url.path}" + \
                (f"; use {allowed}" if allowed else "")
        else:
            message = str(error.detail) or HTTPStatus(error.status_code).phrase
        return error_response(APIError(error.status_code, message), headers=error.headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, _: ClientDisconnect) -> Response:
        # The client hung up while sending its body: nothing went wrong here and nobody is
        # left to answer (499 is what nginx logs for this). A handler for this exact class
        # also keeps Starlette from re-raising it as an unhandled error.
        logger.info("client disconnected while sending its request body (%s %s)", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error: {type(error).__name__}: {error}"))
