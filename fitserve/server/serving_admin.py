"""Admin endpoints: `GET/POST /v1/admin/weight-memory`, the memory budget of a BitStack model.

POST {"bytes": 314572800} or {"bytes": "300MiB"} moves the running model to that budget: the
blocks it adds are read in the background and the switch happens between engine steps, so
requests in flight keep streaming; the answer comes once the model holds the new weights.
GET (and every POST answer) reports current bytes, the budget, the valid range and blocks.
"""

from __future__ import annotations

import json
from typing import Any

from fitserve.config import ConfigError
from fitserve.server.errors import APIError
from fitserve.server.serving_common import ServerState


def _not_elastic() -> APIError:
    return APIError(400, "this model's weight memory is fixed: only BitStack models (made with `fitserve quantize "
                         "MODEL --method bitstack --out DIR`) can be resized", code="not_resizable")


def weight_memory(state: ServerState) -> dict[str, Any]:
    info = state.async_engine.weight_memory_info()
    if info is None:
        raise _not_elastic()
    return info.to_dict()


def _budget_from(raw_body: bytes) -> str | int:
    try:
        body = json.loads(raw_body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from error
    budget = body.get("bytes") if isinstance(body, dict) else None
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise APIError(400, 'send {"bytes": N} with N a number of bytes or a size such as "300MiB"', param="bytes")
    return budget


async def set_weight_memory(state: ServerState, raw_body: bytes) -> dict[str, Any]:
    if state.async_engine.weight_memory_info() is None:
        raise _not_elastic()
    budget = _budget_from(raw_body)
    try:
        info = await state.async_engine.set_weight_memory(budget)
    except ConfigError as error:  # out of range, or not a size: the message gives the valid range
        raise APIError(400, str(error), param="bytes") from error
    return info.to_dict()
