"""The reviewed default phrase library as an LLM client: ``--llm defaults`` stores it as a versioned
prompt set through the same validation and provenance path, with no model at all."""

from __future__ import annotations

import json

from prompts.filo import DEFAULTS_FILE, load_filo_defaults


class LibraryClient:
    name = "defaults"
    model = DEFAULTS_FILE

    def __init__(self, category: str) -> None:
        self.category = category

    def complete(self, system: str, user: str, *, temperature: float, max_tokens: int) -> str:
        return json.dumps({"defects": load_filo_defaults(self.category)})
