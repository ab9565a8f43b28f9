"""OpenAI-compatible chat completions over plain HTTP (``POST {base}/chat/completions``).

Works with OpenAI and with local servers speaking the same protocol (vLLM, llama.cpp, Ollama).
Standard library only (urllib), so the worker image needs no HTTP client dependency.
The API key is sent in the Authorization header and never appears in errors, logs or reprs.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from workers.llm.base import LLMError, LLMUnavailable

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 2
# 408/409/429 and 5xx are the server's way of saying "not now"; other 4xx will not change on retry.
_TRANSIENT_STATUS = {408, 409, 425, 429}
_MAX_RETRY_AFTER = 30.0


def base_url_host(base_url: str) -> str:
    """``host[:port]`` of a base URL without any user:password part (for provenance and messages)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


class OpenAIHTTPClient:
    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.5,
    ) -> None:
        if not model:
            raise LLMError("no LLM model: pass --model or set INSPECT_LLM_MODEL")
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        if urlsplit(self.base_url).scheme not in ("http", "https"):
            raise LLMError("OPENAI_BASE_URL must start with http:// or https://")
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff

    def __repr__(self) -> str:  # the key stays out of tracebacks and logs
        return f"OpenAIHTTPClient(model={self.model!r}, host={self.host!r})"

    @property
    def host(self) -> str:
        return base_url_host(self.base_url)

    def complete(self, system: str, user: str, *, temperature: float, max_tokens: int) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        return _message_text(self._post_with_retries("/chat/completions", body))

    def _post_with_retries(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                return self._post(path, body)
            except _Retry as exc:
                if attempt >= self.retries:
                    tries = f"{attempt + 1} attempts" if attempt else "1 attempt"
                    raise LLMUnavailable(f"{exc} (after {tries})") from None
                delay = exc.retry_after if exc.retry_after is not None else self.backoff * 2**attempt
                log.warning("LLM %s: %s; retrying in %.1fs", self.host, exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code >= 500 or exc.code in _TRANSIENT_STATUS:
                raise _Retry(f"{self.host} answered HTTP {exc.code}{detail}", _retry_after(exc)) from None
            raise LLMError(f"{self.host} refused the request: HTTP {exc.code}{detail}") from None
        except urllib.error.URLError as exc:
            raise _Retry(f"cannot reach {self.host}: {exc.reason}") from None
        except TimeoutError:
            raise _Retry(f"{self.host} did not answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:  # reset or cut off mid-response
            raise _Retry(f"connection to {self.host} failed: {exc}") from None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LLMError(f"{self.host} answered malformed JSON ({exc}): {raw[:200]!r}") from None
        if not isinstance(doc, dict):
            raise LLMError(f"{self.host} answered JSON that is not an object: {raw[:200]!r}")
        return doc


class _Retry(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER) if value else None
    except ValueError:  # an HTTP date: fall back to our own backoff
        return None


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI: {"error": {"message": ...}}), shortened."""
    try:
        text = exc.read().decode("utf-8", "replace")
    except OSError:
        return ""
    try:
        doc = json.loads(text)
        err = doc.get("error") if isinstance(doc, dict) else None
        text = str(err.get("message") if isinstance(err, dict) else err or text)
    except json.JSONDecodeError:
        pass
    text = " ".join(text.split())[:300]
    return f": {text}" if text else ""


def _message_text(doc: dict[str, Any]) -> str:
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices:
        raise LLMError(f"answer has no choices: {json.dumps(doc)[:200]}")
    first = choices[0] if isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        reason = first.get("finish_reason")
        raise LLMError(f"answer has no message text (finish_reason={reason!r})")
    return content
