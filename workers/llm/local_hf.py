"""A local causal LM (transformers) as an LLM client: air-gapped sites run describe without any API.

The model directory is whatever ``save_pretrained`` wrote (weights, config, tokenizer). It is
loaded on first use in the worker process and kept for the next job (describe jobs are rare but
loading a multi-GB model per job would dominate). transformers is imported lazily so the
orchestrator and the HTTP backend never pay for it. ``trust_remote_code`` stays off: a model
directory must not be able to run code in the worker.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from workers.llm.base import LLMError

log = logging.getLogger(__name__)
_lock = threading.Lock()
_loaded: dict[tuple[str, str], tuple[Any, Any]] = {}  # (path, device) -> (model, tokenizer); one entry


def _load(path: str, device: str) -> tuple[Any, Any]:
    key = (path, device)
    with _lock:
        if key not in _loaded:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
            except (OSError, ValueError) as exc:
                raise LLMError(f"cannot load a causal LM from {path}: {exc}") from None
            _loaded.clear()  # keep one model: a second would double the memory held
            _loaded[key] = (model, tokenizer)
            log.info("local LLM %s loaded on %s", path, device)
        return _loaded[key]


def unload() -> None:
    """Forget the cached model (tests, or a worker that must free memory)."""
    with _lock:
        _loaded.clear()


class LocalHFClient:
    name = "local"

    def __init__(self, path: str, *, device: str = "auto", seed: int = 0) -> None:
        if not path:
            raise LLMError("no local model: pass --local-path DIR (a save_pretrained directory)")
        if not Path(path).is_dir():
            raise LLMError(f"local model path {path} is not a directory")
        self.path = str(Path(path).resolve())
        self.model = Path(self.path).name
        self.device = device
        self.seed = seed

    def complete(self, system: str, user: str, *, temperature: float, max_tokens: int) -> str:
        import torch

        device = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = _load(self.path, device)
        prompt = _render(tokenizer, system, user)
        # A rendered chat template already holds its special tokens; a plain prompt gets the usual BOS.
        templated = bool(getattr(tokenizer, "chat_template", None))
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated)
        n_prompt = inputs["input_ids"].shape[1]
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit and n_prompt + max_tokens > limit:
            raise LLMError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceed the model's {limit}")
        sample = temperature > 0
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": sample, "pad_token_id": pad}
        if sample:
            kwargs["temperature"] = temperature
        # A seeded, forked RNG: the same job gives the same answer without touching global state.
        cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed)
            with torch.inference_mode():
                out = model.generate(**{k: v.to(device) for k, v in inputs.items()}, **kwargs)
        return tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True).strip()


def _render(tokenizer: Any, system: str, user: str) -> str:
    """The tokenizer's chat template when it has one, else a plain instruction prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # some templates (Gemma) refuse a system role: fold it into the user turn
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{user}\n\nAnswer:\n"
