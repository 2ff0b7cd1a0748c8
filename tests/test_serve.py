"""`dgemma serve` end to end: the real openai client against a live uvicorn server on the bundled model (CPU).

Covers chat and completions (streamed and not, equal text for equal seeds), draft comment lines, stop strings,
the thought channel, 16 concurrent streams equal to their solo runs, cancellation on disconnect, prefix reuse
across chat turns, errors in OpenAI's shape, the API key, /health, /v1/models, /metrics and the CLI wiring.
"""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx2 as httpx
import openai
import pytest
import uvicorn

from dgemma.api import LLM
from dgemma.serve import build_app

FAST = {"max_denoising_steps": 16}  # fewer steps per canvas: the tests care about the plumbing, not the text
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def llm():
    return LLM(None, device="cpu")


@contextmanager
def live_server(llm, **build_kw):
    """Run the app with uvicorn on a free 127.0.0.1 port in a thread; yields (base_url, app)."""
    app = build_app(llm, **build_kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(llm):
    with live_server(llm, max_model_len=MAX_MODEL_LEN) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, content="Tell me about love.", **kw):
    kw.setdefault("extra_body", FAST)
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}], **kw)


def _stream_text(stream) -> tuple[str, str | None, object]:
    text, reason, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            part = choice.delta.content if hasattr(choice, "delta") else choice.text
            text.append(part or "")
            reason = choice.finish_reason or reason
    return "".join(text), reason, usage


def _engine(app) -> dict:
    return app.state.scheduler.metrics()


def _wait(cond, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# --- OpenAI-compatible routes -------------------------------------------------------------------------------------
def test_chat_streamed_equals_whole(client):
    whole = _chat(client, seed=3, max_tokens=128)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert choice.message.content  # the demo model writes word salad, but it writes something
    usage = whole.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 128
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.canvases >= 1 and usage.steps >= usage.canvases and usage.tokens_per_forward > 0
    text, reason, stream_usage = _stream_text(_chat(client, seed=3, max_tokens=128, stream=True,
                                                    stream_options={"include_usage": True}))
    assert (text, reason) == (choice.message.content, choice.finish_reason)
    assert stream_usage.completion_tokens == usage.completion_tokens


def test_completions_streamed_equals_whole_and_token_prompts(client, llm):
    kw = dict(model="default", seed=5, max_tokens=100, extra_body=FAST)
    whole = client.completions.create(prompt="Love is", **kw)
    assert whole.object == "text_completion" and whole.choices[0].text
    text, reason, _ = _stream_text(client.completions.create(prompt="Love is", stream=True, **kw))
    assert (text, reason) == (whole.choices[0].text, whole.choices[0].finish_reason)
    ids = llm.encode_prompt("Love is")
    assert client.completions.create(prompt=ids, **kw).choices[0].text == whole.choices[0].text


def test_length_limit_and_stop_string(client):
    kw = dict(model="default", prompt="The", seed=11, extra_body=FAST)
    short = client.completions.create(max_tokens=3, **kw)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    full = client.completions.create(max_tokens=128, **kw).choices[0].text
    assert len(full) >= 8, full
    stop = full[4:7]
    expect = full[:full.index(stop)]
    cut = client.completions.create(max_tokens=128, stop=[stop, "\x00never"], **kw).choices[0]
    assert (cut.text, cut.finish_reason) == (expect, "stop")
    text, reason, _ = _stream_text(client.completions.create(max_tokens=128, stop=stop, stream=True, **kw))
    assert (text, reason) == (expect, "stop")


def test_drafts_are_comment_lines_the_openai_client_skips(client, server, llm):
    body = {"model": "default", "messages": [{"role": "user", "content": "Hello"}], "seed": 2, "max_tokens": 64,
            "stream": True, "stream_options": {"include_drafts": True}, **FAST}
    drafts, data = [], []
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=120) as res:
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
        for line in res.iter_lines():
            if line.startswith(": dgemma-draft "):
                drafts.append(json.loads(line[len(": dgemma-draft "):]))
            elif line.startswith("data: "):
                data.append(line[6:])
    assert data[-1] == "[DONE]" and drafts
    C = llm.args.canvas_length
    for d in drafts:
        assert len(d["tokens"]) == len(d["text"]) == len(d["settled"]) == C and d["limit"] == 64
    assert [d["step"] for d in drafts if d["canvas"] == 0] == list(range(1, 1 + sum(d["canvas"] == 0 for d in drafts)))
    assert not any(drafts[0]["settled"]) and any(drafts[-1]["settled"])
    raw_text = "".join(json.loads(x)["choices"][0]["delta"].get("content", "") for x in data[:-1])
    text, reason, _ = _stream_text(_chat(client, "Hello", seed=2, max_tokens=64, stream=True,
                                         stream_options={"include_drafts": True}))
    assert text == raw_text == _chat(client, "Hello", seed=2, max_tokens=64).choices[0].message.content


def test_thinking_returns_reasoning_content(client):
    plain = _chat(client, seed=1, max_tokens=64)
    think = _chat(client, seed=1, max_tokens=64, extra_body={**FAST, "chat_template_kwargs": {"enable_thinking": True}})
    message = think.choices[0].message
    assert isinstance(message.reasoning_content, str)  # the demo model rarely opens the channel: may be ""
    assert not hasattr(plain.choices[0].message, "reasoning_content") or plain.choices[0].message.reasoning_content \
        is None
    assert think.usage.prompt_tokens > plain.usage.prompt_tokens  # the system turn with <|think|>


def test_sixteen_concurrent_streams_equal_their_solo_runs(client, server):
    app = server[1]
    prompts = [f"Question {i}: what is {['love', 'life', 'time', 'luck'][i % 4]}?" for i in range(16)]
    kw = dict(max_tokens=64, extra_body={"max_denoising_steps": 12})
    rows_before = app.state.metrics.batch_rows.collect()[0]

    def one(i):
        return _stream_text(_chat(client, prompts[i], seed=100 + i, stream=True, **kw))

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, range(16)))
    solo = [_chat(client, prompts[i], seed=100 + i, **kw).choices[0] for i in range(16)]
    assert [(t, r) for t, r, _ in together] == [(c.message.content, c.finish_reason) for c in solo]
    samples = {s.labels.get("le"): s.value for s in app.state.metrics.batch_rows.collect()[0].samples
               if s.name.endswith("_bucket")}
    before = {s.labels.get("le"): s.value for s in rows_before.samples if s.name.endswith("_bucket")}
    assert samples["1.0"] - before["1.0"] < samples["+Inf"] - before["+Inf"]  # some steps ran more than one row


def test_disconnect_mid_stream_cancels_and_frees_the_slot(server):
    url, app = server
    before = _engine(app)["requests_cancelled"]
    body = {"model": "default", "prompt": "The", "max_tokens": 448, "stream": True, "max_denoising_steps": 48,
            "confidence_threshold": 1e-9, "stream_options": {"include_drafts": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as res:
        for line in res.iter_lines():
            if line.startswith(": dgemma-draft"):
                break  # leave mid-canvas
    assert _wait(lambda: _engine(app)["requests_cancelled"] == before + 1 and _engine(app)["active"] == 0)


def test_non_streamed_client_timeout_cancels(server):
    url, app = server
    before = _engine(app)["requests_cancelled"]
    body = {"model": "default", "prompt": "The", "max_tokens": 448, "max_denoising_steps": 48,
            "confidence_threshold": 1e-9}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=body, timeout=0.3)
    assert _wait(lambda: _engine(app)["requests_cancelled"] == before + 1 and _engine(app)["active"] == 0)


def test_second_chat_turn_reuses_the_cached_prefix(client, llm):
    first = _chat(client, "Say something wise.", seed=7, max_tokens=64)
    messages = [{"role": "user", "content": "Say something wise."},
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And again?"}]
    second = client.chat.completions.create(model="default", messages=messages, seed=8, max_tokens=64,
                                            extra_body=FAST)
    # the new prompt shares everything up to the first answer's `<|turn>model\n` (the empty thought then differs)
    p1, p2 = llm.encode_prompt(messages[:1], chat=True), llm.encode_prompt(messages, chat=True)
    shared = next(i for i, (a, b) in enumerate(zip(p1, p2)) if a != b)
    assert len(p1) - 5 <= shared and second.usage.prompt_tokens_details.cached_tokens == shared


# --- errors, in OpenAI's shape ------------------------------------------------------------------------------------
def _msgs(content="hi"):
    return [{"role": "user", "content": content}]


BAD_CHAT = [
    ({"model": "default", "messages": _msgs(), "temperature": 0.7}, 400, "temperature", "t_min"),
    ({"model": "default", "messages": _msgs(), "n": 2}, 400, "n", "n=1"),
    ({"model": "default", "messages": _msgs(), "top_p": 0.9}, 400, "top_p", "entropy_bound"),
    ({"model": "default", "messages": _msgs(), "logprobs": True}, 400, "logprobs", "logprobs"),
    ({"model": "default", "messages": _msgs(), "tools": [{"type": "function"}]}, 400, "tools", "tool"),
    ({"model": "default", "messages": _msgs(), "response_format": {"type": "json_schema"}}, 400, "response_format",
     "json_schema"),
    ({"model": "default", "messages": _msgs(), "num_denoising_steps": 4}, 400, "num_denoising_steps",
     "max_denoising_steps"),
    ({"model": "default", "messages": _msgs(), "stream_options": {"include_logits": True}}, 400,
     "stream_options.include_logits", "include_drafts"),
    ({"model": "default", "messages": _msgs(), "max_tokens": "12"}, 400, "max_tokens", "integer"),
    ({"model": "default", "messages": _msgs(), "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ({"model": "default", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ({"model": "default", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "user"),
    ({"model": "default", "messages": []}, 400, "messages", "at least 1"),
    ({"messages": _msgs()}, 400, "model", "required"),
    ({"model": "default", "messages": _msgs(), "t_min": 0.9, "t_max": 0.5}, 400, "t_max", "t_min"),
    ({"model": "default", "messages": _msgs(), "stability_threshold": 100}, 400, "stability_threshold", "less than"),
    ({"model": "default", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content", "text parts"),
    ({"model": "default", "messages": _msgs(), "max_tokens": 4096}, 400, "max_tokens", "max_model_len"),
    ({"model": "default", "messages": _msgs("love " * 600)}, 400, "messages", "max_model_len"),
    ({"model": "gpt-4o", "messages": _msgs()}, 404, "model", "not served"),
]


@pytest.mark.parametrize("body,status,param,words", BAD_CHAT, ids=[b[2] + f"-{i}" for i, b in enumerate(BAD_CHAT)])
def test_bad_chat_requests_get_a_4xx_naming_the_field(server, body, status, param, words):
    res = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30)
    err = res.json()["error"]
    assert res.status_code == status and set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err


@pytest.mark.parametrize("content,words", [(b'{"model": "default", "messages": [', "not valid JSON"),
                                           (b"[1, 2]", "JSON object"), (b"", "JSON object")])
def test_bad_json_is_a_400(server, content, words):
    res = httpx.post(server[0] + "/v1/chat/completions", content=content,
                     headers={"Content-Type": "application/json"}, timeout=30)
    assert res.status_code == 400 and words in res.json()["error"]["message"]


def test_bad_completion_requests(server):
    url = server[0] + "/v1/completions"
    for body, param in [({"model": "default", "prompt": ["a", "b"]}, "prompt"),
                        ({"model": "default", "prompt": ""}, "prompt"),
                        ({"model": "default", "prompt": [999999]}, "prompt"),
                        ({"model": "default", "prompt": "x", "echo": True}, "echo"),
                        ({"model": "default", "prompt": "x", "best_of": 3}, "best_of"),
                        ({"model": "default", "prompt": "x", "stop": ""}, "stop")]:
        res = httpx.post(url, json=body, timeout=30)
        assert res.status_code == 400 and res.json()["error"]["param"] == param, (body, res.text)
    assert httpx.get(server[0] + "/v1/nothing").status_code == 404
    assert httpx.get(url).json()["error"]["code"] == "method_not_allowed"


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError, match="t_min"):
        _chat(client, temperature=0.5)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="nope", messages=_msgs())


# --- health, models, metrics, API key, CLI -----------------------------------------------------------------------
def test_health_models_metrics_schema(server, client):
    url = server[0]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    models = client.models.list().data
    assert [m.id for m in models] == ["default"] and models[0].max_model_len == MAX_MODEL_LEN
    _chat(client, max_tokens=8)
    text = httpx.get(url + "/metrics").text
    for name in ("dgemma_requests_total{", "dgemma_generation_tokens_total", "dgemma_step_seconds_bucket",
                 "dgemma_canvas_seconds_bucket", "dgemma_batch_occupancy_bucket", "dgemma_engine_queue_depth",
                 "dgemma_engine_active", "dgemma_time_to_first_token_seconds_count"):
        assert name in text, name
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(paths)
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "dgemma" in page.text and "http" not in page.text.replace("http-equiv", "")
    assert httpx.get(url + "/static/playground.js").status_code == 200


def test_api_key_is_enforced(llm):
    with live_server(llm, api_key="sekret", max_model_len=256) as (url, _):
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        res = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="default", prompt="Hi", max_tokens=4, extra_body=FAST).choices


def test_cli_serve_wiring(monkeypatch):
    import dgemma.serve
    from dgemma.cli.main import main

    seen = {}
    monkeypatch.setattr(dgemma.serve, "build_app", lambda llm, **kw: seen.update(kw) or _FakeApp(kw["model_name"]))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    monkeypatch.setenv("DGEMMA_API_KEY", "from-env")
    assert main(["serve", "--device", "cpu", "--max-batch", "4", "--port", "0"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["api_key"] == "from-env" and seen["max_batch"] == 4
    assert main(["serve", "--device", "cpu", "--api-key", "flag", "--host", "0.0.0.0", "--port", "0"]) == 0
    assert seen["api_key"] == "flag" and seen["host"] == "0.0.0.0"
    assert main(["serve", "--max-batch", "0"]) == 2


class _FakeApp:
    def __init__(self, name):
        self.state = type("State", (), {"config": type("Config", (), {"model_name": name})()})()
