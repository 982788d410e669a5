"""Who a request belongs to and how urgent it is, from HTTP to the engine.

A key from --api-keys-file names its tenant, and the tenant is the client the scheduler
shares service between (it wins over the OpenAI `user` field); `priority` (vLLM's extension)
reaches the engine on both endpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fitserve.config import ConfigError
from fitserve.engine.async_engine import AsyncLLMEngine
from fitserve.engine.engine import LLMEngine
from fitserve.server.api_keys import load_api_keys_file
from fitserve.server.app import build_app
from fitserve.server.serving_common import ServerSettings
from tests.server.conftest import MODEL_NAME, engine_args_for

KEYS_FILE = """# key        tenant   weight
sk-alpha-1    alpha    2
sk-alpha-2    alpha
sk-beta       beta
"""


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server with a keys file and the (client, priority) of every request the engine got."""
    keys_path = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_path.write_text(KEYS_FILE)
    engine = LLMEngine(engine_args_for(tiny_model_dir))
    seen: list[tuple[str | None, int]] = []
    original_prepare = engine.prepare_request

    def recording_prepare(*args, **kwargs):
        seen.append((kwargs.get("client_id"), kwargs.get("priority", 0)))
        return original_prepare(*args, **kwargs)

    engine.prepare_request = recording_prepare  # type: ignore[method-assign]
    settings = ServerSettings(served_model_names=[MODEL_NAME], api_keys=load_api_keys_file(keys_path))
    with TestClient(build_app(AsyncLLMEngine(engine), settings)) as client:
        yield client, seen


def post(client: TestClient, path: str, key: str, **body) -> int:
    body = {"max_tokens": 2, "temperature": 0} | body
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hello"
    return client.post(path, json=body, headers={"Authorization": f"Bearer {key}"}).status_code


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_tenant_wins_over_user_and_priority_reaches_the_engine(served, path: str) -> None:
    client, seen = served
    seen.clear()
    assert post(client, path, "sk-alpha-2", user="mallory", priority=-3) == 200
    assert post(client, path, "sk-beta") == 200
    assert seen == [("alpha", -3), ("beta", 0)]


def test_unknown_key_and_bad_priority_are_refused(served) -> None:
    client, _ = served
    assert post(client, "/v1/completions", "sk-gamma") == 401
    assert post(client, "/v1/completions", "sk-beta", priority="high") == 400


def test_keys_file_weights_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text(KEYS_FILE)
    keys = load_api_keys_file(good)
    assert keys.tenants == {"sk-alpha-1": "alpha", "sk-alpha-2": "alpha", "sk-beta": "beta"}
    assert keys.weights == {"alpha": 2.0}
    assert keys.tenant_of("sk-beta") == "beta" and keys.tenant_of("sk-bet") is None
    for text, message in [("k1 t1 2\nk2 t1 3\n", "line 2: tenant 't1' was given weight 2.0 before"),
                          ("k1 t1 zero\n", "line 1: the weight must be a positive number"),
                          ("k1\n", "line 1: expected 'KEY TENANT \\[WEIGHT\\]', got 1 fields"),
                          ("k1 a\nk1 b\n", "line 2: the key is listed twice"),
                          ("# nothing\n", "lists no keys")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_api_keys_file(bad)
    with pytest.raises(ConfigError, match="cannot read --api-keys-file"):
        load_api_keys_file(tmp_path / "missing.txt")
