"""/openapi.json documents the real request schemas, and schemathesis fuzzes the API from it:
whatever it generates, valid or not, no answer is a server error or an undocumented status.

The fuzz run is bounded (a fixed number of examples per operation, no shrinking) and runs
against its own server whose fan-out limit is small, so generated requests stay cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error, status_code_conformance

from fitserve.server.protocol import CompletionRequest

from .conftest import API_KEY, RunningServer, engine_args_for, serve_in_thread


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path) -> Iterator[RunningServer]:
    # A short context keeps every generated request cheap: most generate a few tokens at most.
    engine_args = dataclasses.replace(engine_args_for(tiny_model_dir), max_model_len=48)
    with serve_in_thread(tiny_model_dir, engine_args, max_choices_per_request=4) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(fuzz_server: RunningServer):
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


def test_openapi_documents_the_validated_request_bodies(server: RunningServer) -> None:
    document = httpx.get(f"{server.base_url}/openapi.json", timeout=30).json()
    body = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    completion = document["components"]["schemas"]["CompletionRequest"]
    assert set(completion["properties"]) == set(CompletionRequest.model_fields)
    assert completion["required"] == ["prompt"]
    assert "messages" in document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert document["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_server_error(case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                           checks=[not_a_server_error, status_code_conformance])
