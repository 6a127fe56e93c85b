"""Real servers on loopback for the tests of the openai backend: llama-cpp-python's OpenAI-compatible server
serving the bundled GGUF, and a fault-injecting HTTP proxy to put in front of it."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

API_KEY = "test-key-9f1c2e"  # the test server's key; tests check it is never written anywhere


def free_port() -> int:
    """A TCP port nothing listens on (bound then released by the OS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1 serving a GGUF file, started and stopped by the tests.

    `n_batch=1` (the default here) makes the server deterministic. The server keeps the KV cache of the
    previous request's tokens and evaluates only what follows the common prefix, in one batch; its kernels
    give other numbers for other batch sizes, so with a large n_batch a log-probability moves by up to 0.05
    nats from request to request (and a seeded sample can change). One token per batch evaluates every
    token the same way, whatever was cached."""

    def __init__(
        self,
        gguf: Path,
        port: int | None = None,
        log: Path | None = None,
        alias: str = "smollm2",
        threads: int = 1,
        n_batch: int = 1,
    ):
        self.gguf = gguf
        self.n_batch = n_batch
        self.threads = threads
        self.port = port or free_port()
        self.alias = alias
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model_name(self) -> str:
        return f"openai:{self.url}#{self.alias}"

    def start(self, timeout: float = 180.0) -> LlamaServer:
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf), "--model_alias", self.alias,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--logits_all", "true", "--n_ctx", "2048",
            "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
            "--api_key", API_KEY, "--verbose", "false",
            "--n_batch", str(self.n_batch), "--n_ubatch", str(self.n_batch),
        ]  # fmt: skip
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode} (log: {self.log})")
            request = urllib.request.Request(
                f"{self.url}/models", headers={"Authorization": f"Bearer {API_KEY}"}
            )
            try:
                with urllib.request.urlopen(request, timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {timeout} s (log: {self.log})")

    def stop(self) -> None:
        """Kill the server outright (SIGKILL: as a crashed or killed server would go)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


def _reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes, ctype: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _LoopbackServer:
    """A threaded HTTP server on a free port of 127.0.0.1, run in a thread for the length of a `with`."""

    def _serve(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base URL for clients (paths under /v1/ are the server's)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):  # noqa: ANN204
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class FaultProxy(_LoopbackServer):
    """An HTTP proxy on loopback in front of a server: it forwards requests, and on a schedule answers 500
    instead or delays its answer. It counts the requests it saw and the most it had in flight at once.
    `upstream` is the server's root URL (no /v1); given several, requests go to them in turn (a round-robin
    load balancer over replicas)."""

    def __init__(
        self, upstream: str | list[str], *, fail_every: int = 0, delay: float = 0.0, delay_every: int = 0
    ):
        upstreams = [upstream] if isinstance(upstream, str) else list(upstream)
        self.upstreams = [urllib.parse.urlsplit(u.rstrip("/")) for u in upstreams]
        self.fail_every = fail_every
        self.delay = delay
        self.delay_every = delay_every
        self.lock = threading.Lock()
        self.seen = 0
        self.failed = 0
        self.in_flight = 0
        self.max_in_flight = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._handle(b"")

            def do_POST(self) -> None:  # noqa: N802
                self._handle(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _handle(self, body: bytes) -> None:
                with proxy.lock:
                    proxy.seen += 1
                    n = proxy.seen
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    if proxy.delay_every and n % proxy.delay_every == 0:
                        time.sleep(proxy.delay)
                    if proxy.fail_every and n % proxy.fail_every == 0:
                        with proxy.lock:
                            proxy.failed += 1
                        self._send(500, b'{"error": {"message": "injected failure"}}', "application/json")
                        return
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() in ("authorization", "content-type")
                    }
                    up = proxy.upstreams[n % len(proxy.upstreams)]
                    conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port or 80, timeout=300)
                    try:
                        conn.request(self.command, self.path, body=body or None, headers=headers)
                        r = conn.getresponse()
                        content = r.read()
                        self._send(r.status, content, r.getheader("content-type", "application/json"))
                    finally:
                        conn.close()
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                _reply(self, status, body, ctype)

        self._serve(Handler)


class PromptLogprobsServer(_LoopbackServer):
    """A minimal OpenAI-compatible server that answers the way vLLM does for `prompt_logprobs`, with exact
    numbers from a local transformers model: GET /v1/models, and POST /v1/completions with the prompt given
    as token ids and `prompt_logprobs: k` (one plain forward pass; the reply's `prompt_logprobs` is a list with
    None first, then one {token id: {logprob, rank, decoded_token}} mapping per prompt token). vLLM itself
    needs a GPU; this checks maskscope's side of that exchange against known numbers."""

    def __init__(self, hf: Any, name: str = "reference"):
        self.hf = hf
        self.name = name
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._json(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                ids = body.get("prompt")
                if not isinstance(ids, list) or "prompt_logprobs" not in body:
                    self._json(
                        400, {"error": {"message": "this server takes token-id prompts with prompt_logprobs"}}
                    )
                    return
                self._json(200, server.complete(ids))

            def _json(self, status: int, data: Any) -> None:
                _reply(self, status, json.dumps(data).encode(), "application/json")

        self._serve(Handler)

    def complete(self, ids: list[int]) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            logits = self.hf.model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        rows: list[Any] = [None]
        for t in range(1, len(ids)):
            value = lp[t - 1, ids[t]]
            rank = int((lp[t - 1] > value).sum()) + 1
            rows.append({str(ids[t]): {"logprob": float(value), "rank": rank, "decoded_token": ""}})
        nxt = int(lp[-1].argmax())
        return {
            "id": "cmpl-reference",
            "object": "text_completion",
            "created": 0,
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "text": self.hf.tokenizer.decode([nxt]),
                    "logprobs": None,
                    "finish_reason": "length",
                    "prompt_logprobs": rows,
                }
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1},
        }


class ChatOnlyServer(_LoopbackServer):
    """A loopback server that answers like a chat-only hosted API: GET /v1/models and POST
    /v1/chat/completions only (the completions endpoint answers 404, so there is no echo and no prompt
    log-probabilities), `top_logprobs` at most 20, and HTTP 400 for a request argument it does not know (as
    hosted APIs refuse llama.cpp's `top_k`, `min_p`, `repeat_penalty`).

    Its replies follow `policy(system, user) -> {reply: probability}`, known to the tests: a sample is drawn
    with `random.Random(seed)`, and the first token of a reply is its first whitespace-separated word, so the
    top log-probabilities it returns are the policy's first-word distribution, exactly."""

    ALLOWED = frozenset(
        {
            "model",
            "messages",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "n",
            "logprobs",
            "top_logprobs",
        }
    )
    TOP_LOGPROBS_LIMIT = 20

    def __init__(self, policy: Any, name: str = "chat-only"):
        self.policy = policy
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                server.requests.append(body)
                server.paths.append(self.path)
                if not self.path.endswith("/chat/completions"):
                    self._json(
                        404,
                        {
                            "error": {
                                "message": "This is a chat model and not supported in the "
                                "v1/completions endpoint."
                            }
                        },
                    )
                    return
                unknown = sorted(set(body) - server.ALLOWED)
                if unknown:
                    self._json(
                        400, {"error": {"message": f"Unrecognized request argument supplied: {unknown[0]}"}}
                    )
                    return
                if (body.get("top_logprobs") or 0) > server.TOP_LOGPROBS_LIMIT:
                    self._json(400, {"error": {"message": "top_logprobs must be at most 20"}})
                    return
                self._json(200, server.complete(body))

            def _json(self, status: int, data: Any) -> None:
                _reply(self, status, json.dumps(data).encode(), "application/json")

        self._serve(Handler)

    @staticmethod
    def first_words(dist: dict[str, float]) -> dict[str, float]:
        """The distribution of a reply distribution's first word (the server's first token)."""
        out: dict[str, float] = {}
        for reply, p in dist.items():
            word = reply.split()[0]
            out[word] = out.get(word, 0.0) + p
        return out

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        import math
        import random

        messages = body["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        dist = self.policy(system, user)
        replies, weights = list(dist), list(dist.values())
        choices = []
        if body.get("logprobs"):
            words = sorted(self.first_words(dist).items(), key=lambda kv: -kv[1])
            top = [{"token": w, "logprob": math.log(p), "bytes": list(w.encode())} for w, p in words]
            first = top[0]
            content = [{**first, "top_logprobs": top[: body.get("top_logprobs") or 0]}]
            choices.append(
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": first["token"]},
                    "logprobs": {"content": content},
                    "finish_reason": "length",
                }
            )
        else:
            rng = random.Random(body.get("seed"))
            for i in range(body.get("n") or 1):
                text = rng.choices(replies, weights)[0]
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                )
        return {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 0,
            "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
