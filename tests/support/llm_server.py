"""Test helpers for the LLM backends: a scripted chat-completions server on loopback, a tiny local causal LM."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API_KEY = "sk-test-secret-0123456789"
GOOD_DEFECTS = ["missing component", "bent pin", "scratch on the board", "burnt mark", "solder bridge"]


def chat_body(content: str, finish_reason: str = "stop") -> bytes:
    doc = {"id": "cmpl-1", "object": "chat.completion", "model": "test-model",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                        "finish_reason": finish_reason}]}
    return json.dumps(doc).encode()


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def ok(content: str) -> Reply:
    return Reply(200, chat_body(content))


def good_answer(defects: list[str] | None = None) -> Reply:
    return ok(json.dumps({"defects": defects or GOOD_DEFECTS}))


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class ChatServer:
    """Answers POST /v1/chat/completions with the scripted replies in order (the last one repeats)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = [good_answer()]
        self.requests: list[Recorded] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append(Recorded(self.path, dict(self.headers), body))
                idx = min(len(server.requests), len(server.replies)) - 1
                reply = server.replies[idx] if self.path == "/v1/chat/completions" else Reply(404, b"{}")
                time.sleep(reply.delay)
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply.body)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out closed the socket under a slow reply: expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def script(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


_TEXT = ("the a of on with and scratch crack dent hole stain bent pin missing component burnt mark board "
         "solder bridge defects json list short phrase { } [ ] \" : , .")
WORDS = _TEXT.split()


def save_tiny_lm(path: Path, *, chat_template: str | None = None, n_positions: int = 1024) -> Path:
    """A 1-layer random GPT-2 and a word-level tokenizer built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    import torch

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(vocab), n_positions=n_positions,
                        bos_token_id=2, eos_token_id=2, pad_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path
