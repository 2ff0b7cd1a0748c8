"""schemathesis against the live server's OpenAPI schema: generated requests, valid and not, never get a 5xx.

Generated bodies keep their shape but are bounded in cost (model "default", at most 2 canvases of 8 steps), so the
run stays well under a minute on CPU; every error answer must be OpenAI's error object.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from test_serve import live_server

from dgemma.serve.protocol import NO_OP

EXAMPLES = 25  # per operation


@pytest.fixture(scope="module")
def api_schema():
    from dgemma.api import LLM

    with live_server(LLM(None, device="cpu"), max_model_len=192) as (url, _):
        yield schemathesis.openapi.from_url(url + "/openapi.json")


def _bound(body, mode) -> None:
    """Keep a generated body's shape but cap what it costs to run. Positive bodies also lose the OpenAI fields that
    are accepted only at a no-op value, so that most of them reach the engine."""
    if not isinstance(body, dict):
        return
    if mode is GenerationMode.POSITIVE:
        for name in (*NO_OP, "temperature", "response_format"):
            body.pop(name, None)
    if "model" in body:
        body["model"] = "default"
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 128)
    body.pop("max_completion_tokens", None)
    if isinstance(body.get("max_denoising_steps"), int):
        body["max_denoising_steps"] = min(body["max_denoising_steps"], 8)
    else:
        body.setdefault("max_denoising_steps", 8)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_no_server_errors(api_schema, mode):
    # schemathesis's own pytest plugin does not run under pytest 9, so drive its hypothesis strategies directly.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # no parameters to break

        @given(case=op.as_strategy(mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            _bound(case.body, mode)
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
            if response.status_code >= 400:  # OpenAI's error object, whatever was wrong
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]

        check()
