"""The client protocol every LLM backend implements, and the two error kinds the stage tells apart."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class LLMError(RuntimeError):
    """Permanent: a retry gives the same result (bad request, refused key, malformed answer)."""


class LLMUnavailable(LLMError):
    """Transient: the endpoint timed out, refused the connection or answered 5xx/429; retry later."""


@runtime_checkable
class LLMClient(Protocol):
    name: str  # backend name recorded in provenance ("openai", "local", ...)
    model: str

    def complete(self, system: str, user: str, *, temperature: float, max_tokens: int) -> str:
        """The assistant's text for one system + user exchange."""
        ...
