"""The local transformers backend on a tiny random GPT-2 saved to disk (no network)."""

from __future__ import annotations

import pytest
from llm_server import save_tiny_lm

from workers.llm import local_hf
from workers.llm.base import LLMClient, LLMError
from workers.llm.local_hf import LocalHFClient, _render
from workers.llm.schema import validate_defects

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    local_hf.unload()
    yield
    local_hf.unload()


def test_generation_runs_and_schema_rejects_random_text(tiny_lm):
    c = LocalHFClient(str(tiny_lm), device="cpu")
    assert isinstance(c, LLMClient) and c.name == "local" and c.model == tiny_lm.name
    text = c.complete("system words", "list the defects of a pcb", temperature=0.0, max_tokens=12)
    assert isinstance(text, str) and text
    with pytest.raises(LLMError) as err:
        validate_defects(text)
    assert "JSON" in str(err.value) or "defect phrases" in str(err.value)


def test_greedy_is_deterministic_and_sampling_is_seeded(tiny_lm):
    c = LocalHFClient(str(tiny_lm), device="cpu", seed=3)
    greedy = [c.complete("s", "u", temperature=0.0, max_tokens=8) for _ in range(2)]
    sampled = [c.complete("s", "u", temperature=1.0, max_tokens=8) for _ in range(2)]
    assert greedy[0] == greedy[1] and sampled[0] == sampled[1]


def test_model_is_loaded_once_per_process(tiny_lm):
    c = LocalHFClient(str(tiny_lm), device="cpu")
    c.complete("s", "u", temperature=0.0, max_tokens=2)
    first = local_hf._loaded[(c.path, "cpu")][0]
    LocalHFClient(str(tiny_lm), device="cpu").complete("s", "u", temperature=0.0, max_tokens=2)
    assert local_hf._loaded[(c.path, "cpu")][0] is first


def test_chat_template_is_used_when_present(tmp_path):
    path = save_tiny_lm(tmp_path / "chat", chat_template=CHAT_TEMPLATE)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert _render(tok, "be brief", "list defects") == "<|system|> be brief\n<|user|> list defects\n<|assistant|> "
    text = LocalHFClient(str(path), device="cpu").complete("s", "u", temperature=0.0, max_tokens=4)
    assert isinstance(text, str)


def test_template_without_system_role_gets_it_folded_into_the_user_turn(tmp_path):
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
              "[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    path = save_tiny_lm(tmp_path / "strict", chat_template=strict)
    from transformers import AutoTokenizer

    assert _render(AutoTokenizer.from_pretrained(path), "sys", "usr") == "[user] sys\n\nusr"


def test_plain_prompt_without_template(tiny_lm):
    from transformers import AutoTokenizer

    assert _render(AutoTokenizer.from_pretrained(tiny_lm), "sys", "usr") == "sys\n\nusr\n\nAnswer:\n"


def test_prompt_longer_than_the_context_is_refused(tmp_path):
    path = save_tiny_lm(tmp_path / "short", n_positions=16)
    with pytest.raises(LLMError, match="exceed the model's 16"):
        LocalHFClient(str(path), device="cpu").complete("s " * 10, "u " * 10, temperature=0.0, max_tokens=8)


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(LLMError, match="--local-path"):
        LocalHFClient("")
    with pytest.raises(LLMError, match="not a directory"):
        LocalHFClient(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMError, match="cannot load a causal LM"):
        LocalHFClient(str(tmp_path / "empty"), device="cpu").complete("s", "u", temperature=0.0, max_tokens=2)
