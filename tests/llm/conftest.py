"""Fixtures for the LLM tests: a real chat-completions server on loopback and a tiny local causal LM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_server import API_KEY, ChatServer, save_tiny_lm


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    server = ChatServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def llm_env(chat_server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> ChatServer:
    """Worker environment pointing the openai backend at the loopback server, short timeout, no retries."""
    monkeypatch.setenv("OPENAI_BASE_URL", chat_server.url)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("INSPECT_LLM_TIMEOUT", "0.5")
    monkeypatch.setenv("INSPECT_LLM_RETRIES", "0")
    monkeypatch.delenv("INSPECT_LLM_MODEL", raising=False)
    return chat_server


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))
