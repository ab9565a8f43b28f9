"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import time

import pytest
from llm_server import API_KEY, GOOD_DEFECTS, Reply, chat_body, good_answer, ok

from workers.llm.base import LLMClient, LLMError, LLMUnavailable
from workers.llm.openai_http import OpenAIHTTPClient, base_url_host
from workers.llm.schema import validate_defects


def client(server, **kw) -> OpenAIHTTPClient:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("backoff", 0.01)
    return OpenAIHTTPClient("test-model", base_url=server.url, api_key=API_KEY, **kw)


def ask(c: OpenAIHTTPClient) -> str:
    return c.complete("system text", "user text", temperature=0.2, max_tokens=50)


def test_good_answer_and_request_shape(chat_server):
    c = client(chat_server)
    assert isinstance(c, LLMClient)
    assert validate_defects(ask(c)) == GOOD_DEFECTS
    (req,) = chat_server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["Authorization"] == f"Bearer {API_KEY}"
    assert req.body == {"model": "test-model", "temperature": 0.2, "max_tokens": 50,
                        "messages": [{"role": "system", "content": "system text"},
                                     {"role": "user", "content": "user text"}]}


def test_env_configures_base_url_and_key(chat_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", chat_server.url + "/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    c = OpenAIHTTPClient("m")
    assert c.base_url == chat_server.url and c.host == chat_server.host
    ask(c)
    assert chat_server.requests[0].headers["Authorization"] == "Bearer sk-from-env"


def test_no_key_sends_no_authorization(chat_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ask(OpenAIHTTPClient("m", base_url=chat_server.url))
    assert "Authorization" not in chat_server.requests[0].headers


def test_malformed_json_body_is_permanent(chat_server):
    chat_server.script(Reply(200, b"<html>gateway</html>"))
    with pytest.raises(LLMError, match="malformed JSON") as err:
        ask(client(chat_server, retries=2))
    assert not isinstance(err.value, LLMUnavailable)
    assert len(chat_server.requests) == 1  # not retried


@pytest.mark.parametrize("body,match", [
    (json.dumps({"choices": []}).encode(), "no choices"),
    (json.dumps({"object": "error"}).encode(), "no choices"),
    (json.dumps({"choices": [{"message": {"role": "assistant", "content": ""}, "finish_reason": "length"}]}).encode(),
     "no message text.*length"),
    (json.dumps([1, 2]).encode(), "not an object"),
])
def test_missing_choices_or_text(chat_server, body: bytes, match: str):
    chat_server.script(Reply(200, body))
    with pytest.raises(LLMError, match=match):
        ask(client(chat_server))


def test_answer_failing_the_schema_comes_back_as_text(chat_server):
    chat_server.script(ok("I cannot help with that."))
    text = ask(client(chat_server))
    with pytest.raises(LLMError, match="not valid JSON"):
        validate_defects(text)


def test_slow_answer_times_out_as_unavailable(chat_server):
    chat_server.script(Reply(200, chat_body("{}"), delay=1.5))
    t0 = time.monotonic()
    with pytest.raises(LLMUnavailable, match=r"did not answer within 0.3s \(after 2 attempts\)"):
        ask(client(chat_server, timeout=0.3, retries=1))
    assert time.monotonic() - t0 < 1.4  # gave up on the timeout, not on the server
    assert len(chat_server.requests) == 2


def test_server_errors_then_success_are_retried(chat_server):
    chat_server.script(Reply(500, b'{"error": {"message": "boom"}}'), Reply(503, b"overloaded"), good_answer())
    assert validate_defects(ask(client(chat_server, retries=2))) == GOOD_DEFECTS
    assert len(chat_server.requests) == 3


def test_server_errors_exhaust_retries(chat_server):
    chat_server.script(Reply(502, b'{"error": {"message": "bad gateway"}}'))
    with pytest.raises(LLMUnavailable, match=r"HTTP 502: bad gateway \(after 3 attempts\)"):
        ask(client(chat_server, retries=2))
    assert len(chat_server.requests) == 3


def test_rate_limit_honours_retry_after(chat_server):
    chat_server.script(Reply(429, b"{}", headers={"Retry-After": "0"}), good_answer())
    assert validate_defects(ask(client(chat_server, retries=1, backoff=5.0))) == GOOD_DEFECTS


def test_unauthorized_is_permanent_and_hides_the_key(chat_server):
    chat_server.script(Reply(401, b'{"error": {"message": "Incorrect API key provided", "type": "auth"}}'))
    c = client(chat_server, retries=2)
    with pytest.raises(LLMError, match="HTTP 401: Incorrect API key provided") as err:
        ask(c)
    assert not isinstance(err.value, LLMUnavailable)
    assert len(chat_server.requests) == 1
    assert API_KEY not in str(err.value) and API_KEY not in repr(c)


def test_bad_request_is_permanent(chat_server):
    chat_server.script(Reply(400, b'{"error": {"message": "model not found"}}'))
    with pytest.raises(LLMError, match="refused the request: HTTP 400: model not found"):
        ask(client(chat_server))


def test_connection_refused_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the request: nothing listens there
    c = OpenAIHTTPClient("m", base_url=f"http://127.0.0.1:{port}/v1", api_key="k", retries=1, backoff=0.01)
    with pytest.raises(LLMUnavailable, match=f"cannot reach 127.0.0.1:{port}"):
        ask(c)


def test_configuration_errors():
    with pytest.raises(LLMError, match="no LLM model"):
        OpenAIHTTPClient("", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(LLMError, match="http:// or https://"):
        OpenAIHTTPClient("m", base_url="file:///etc/passwd")


def test_base_url_host_drops_credentials():
    assert base_url_host("https://user:secret@llm.example.com:8443/v1") == "llm.example.com:8443"
    assert base_url_host("https://api.openai.com/v1") == "api.openai.com"
