"""LLM clients for the describe stage: one protocol, one file per backend (HTTP, local transformers)."""

from workers.llm.base import LLMClient, LLMError, LLMUnavailable

__all__ = ["LLMClient", "LLMError", "LLMUnavailable"]
