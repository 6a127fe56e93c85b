"""The OpenAI-compatible backend: a vLLM, llama.cpp or other server reached over HTTP with the `openai` client.

Model name: ``openai:URL#MODEL``, for example ``openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct``
(``#MODEL`` may be left out when the server serves one model).

The API key comes from the user, never from a spec (a spec is data a user may have downloaded): the environment
variable ``MASKSCOPE_API_KEY``, or another variable the user names on the command line (``--api-key-env``), or
``OPENAI_API_KEY`` when the user opts in (``--use-openai-api-key``). No key (nor credentials written into the URL)
goes over plain http to a host other than this machine unless the user says so (``--allow-insecure-key``). The
key is never written to logs, the store or reports, and URLs are stored and shown with credentials removed.

What a server can do, and so which experiments run, is found out when the model is loaded:

- ``sample``: always. With a local tokenizer (``ServerOptions.tokenizer``) the prompt is rendered here with
  the model's chat template and sent to the completions endpoint, so a prefill works; without one the chat
  endpoint renders it (no prefill).
- ``next_token_distribution``: the top log-probabilities of the first generated token, up to the server's
  limit (``top_logprobs_limit``; a distribution cut by it is marked ``complete = False``).
- ``score`` and ``token_logprobs`` (exact teacher forcing): need the local tokenizer (exact scoring of
  assistant text needs the rendered prompt) and prompt log-probabilities from the server: vLLM's
  ``prompt_logprobs``, else the completions endpoint's ``echo`` with ``logprobs``. Both are probed when the
  model is loaded, and the echo is checked against the log-probability of a generated token (a server that
  misaligns echoed log-probabilities is not used for scoring).
- ``token_ranks`` (each given token's log-probability and rank, for the token shift of the ``diff``
  experiment): vLLM's ``prompt_logprobs`` reports the rank beside the log-probability; echo does not.
- never: full distributions over the vocabulary (``support_logprobs``, ``position_logprobs``: so no exact KL),
  activations, steering.

Requests run in a thread pool (``concurrency`` in flight at most). Rate limits (429), server errors (5xx),
connection errors and timeouts are retried with exponential backoff and full jitter, up to ``max_retries``
per request and ``retry_budget`` for the whole model; the counts are reported by `request_stats` and land in
the run's summary. The retry loop is written here rather than left to the client's own retries because a run
needs one budget shared by all its concurrent requests and the counts for its summary.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maskscope.errors import UserError
from maskscope.models.base import (
    Context,
    Conversation,
    ModelAPI,
    Sample,
    SampleParams,
    Scored,
    TokenDist,
    sample_seed,
    stream_key,
)
from maskscope.models.chat import ChatTokenizer

T = TypeVar("T")

# Sampling parameters that llama.cpp's server sets to non-neutral defaults (top_k 40, min_p 0.05, a repeat
# penalty of 1.1): sent explicitly so that temperature and top_p mean what they mean on every backend. vLLM's
# defaults are already neutral and it ignores the names it does not know.
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "repetition_penalty": 1.0}
# Log-probabilities of an echoed token and of the same token generated must agree to this (natural log).
ECHO_TOLERANCE = 1e-3


class ServerOptions(BaseModel):
    """How maskscope talks to an OpenAI-compatible server."""

    model_config = ConfigDict(extra="forbid")
    path_fields: ClassVar[dict[str, str]] = {"tokenizer": "model"}  # relative to the spec file
    tokenizer: str | None = Field(
        None,
        description='The served model\'s tokenizer, to render prompts locally: "default" (the bundled model), '
        '"hf:DIR" or "gguf:FILE". Needed for exact scoring and prefills.',
    )
    concurrency: int = Field(16, ge=1, le=1024, description="Requests in flight at most.")
    timeout: float = Field(120.0, gt=0, description="Seconds before one request times out (then retried).")
    max_retries: int = Field(6, ge=0, le=100, description="Retries of one request (429, 5xx, connection).")
    retry_budget: int = Field(1000, ge=0, description="Retries allowed in all, across requests.")
    backoff: float = Field(0.5, gt=0, description="Backoff before the first retry, seconds (doubles).")
    max_backoff: float = Field(30.0, gt=0, description="Longest backoff, seconds.")
    top_logprobs_limit: int = Field(20, ge=1, description="Most top log-probabilities the server returns.")
    n_per_request: int = Field(
        1, ge=1, le=1024, description="Samples drawn per request (the `n` parameter; llama.cpp ignores n)."
    )
    neutral_sampling: bool = Field(
        True,
        description="Send llama.cpp's neutral sampling parameters (top_k 0, min_p 0, no repeat penalty) with "
        "every sample request. false for hosted APIs that refuse request arguments they do not know.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_key_choice(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key_env" in data:
            raise ValueError(
                "a spec cannot choose which secret is sent (api_key_env): the key comes from MASKSCOPE_API_KEY, "
                "or from the variable named by the command line's --api-key-env"
            )
        return data


DEFAULT_KEY_ENV = "MASKSCOPE_API_KEY"


@dataclass(frozen=True)
class Credentials:
    """Where the API key comes from and where it may go, as the user (never a spec) decides.

    `key_env`: the environment variable holding the key; `openai_fallback`: also read ``OPENAI_API_KEY`` when
    `key_env` is unset; `allow_insecure`: allow a key over plain http to a host other than this machine."""

    key_env: str = DEFAULT_KEY_ENV
    openai_fallback: bool = False
    allow_insecure: bool = False

    def key(self) -> tuple[str | None, str]:
        """The key (or None) and the name of the variable it came from (or would come from)."""
        value = os.environ.get(self.key_env)
        if value:
            return value, self.key_env
        if self.openai_fallback and os.environ.get("OPENAI_API_KEY"):
            return os.environ["OPENAI_API_KEY"], "OPENAI_API_KEY"
        return None, self.key_env


def redact_url(url: str) -> str:
    """The URL with any user name and password removed (``http://u:p@h/v1`` -> ``http://h/v1``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redact_model_name(name: str) -> str:
    """A model name (``openai:URL#MODEL``, or a bare URL) with credentials removed from its URL."""
    if name.startswith("openai:"):
        return "openai:" + redact_url(name[len("openai:") :])
    if name.startswith(("http://", "https://")):
        return redact_url(name)
    return name


def is_loopback(url: str) -> bool:
    """Whether a URL's host is this machine (localhost, 127.0.0.0/8, ::1)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(url: str, key: str | None, credentials: Credentials) -> None:
    """Refuse to send a key or URL credentials over plain http to another machine without the user's flag."""
    secret = key is not None or "@" in urlsplit(url).netloc
    if secret and urlsplit(url).scheme == "http" and not is_loopback(url) and not credentials.allow_insecure:
        raise UserError(
            f"{redact_url(url)}: refusing to send an API key or credentials over plain http to another machine; "
            "use https, or pass --allow-insecure-key if this network is trusted"
        )


def parse_name(rest: str) -> tuple[str, str | None]:
    """``URL#MODEL`` (the part after ``openai:``) into the base URL and the model name (or None)."""
    url, _, model = rest.partition("#")
    if not url.startswith(("http://", "https://")):
        raise UserError(
            f"openai backend: the URL must start with http:// or https://, not {redact_url(url)!r}"
        )
    return url.rstrip("/"), (model or None)


class RequestStats:
    """Counts of requests, retries and their causes, shared by the threads of one model."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.causes: dict[str, int] = {}

    def count(self, retry_cause: str | None = None) -> None:
        with self.lock:
            if retry_cause is None:
                self.requests += 1
            else:
                self.retries += 1
                self.causes[retry_cause] = self.causes.get(retry_cause, 0) + 1

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": self.requests, "retries": self.retries, "retry_causes": dict(self.causes)}


class OpenAIModel(ModelAPI):
    """A model behind an OpenAI-compatible server, behind the LanguageModel protocol."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        options: ServerOptions | None = None,
        *,
        chat: ChatTokenizer | None = None,
        client: Any = None,
        credentials: Credentials | None = None,
    ) -> None:
        import openai

        self.openai = openai
        self.url = redact_url(base_url)  # what is shown, stored and keyed: never credentials
        self.options = options or ServerOptions()
        self.chat = chat
        self.stats = RequestStats()
        credentials = credentials or Credentials()
        api_key, self.key_env = credentials.key()
        check_transport(base_url, api_key, credentials)
        self.client = client or openai.OpenAI(
            base_url=base_url, api_key=api_key or "none", timeout=self.options.timeout, max_retries=0
        )
        self.model = self._resolve_model(model)
        self.name = f"openai:{self.url}#{self.model}"
        self._raw_echo: bool | None = None  # probed on the first raw-string prompt scored through echo
        self._template_start: int | None = None
        self.scoring = self._probe_scoring() if chat is not None else None
        caps = {"sample", "next_token_distribution"}
        if self.scoring:
            caps |= {"score", "token_logprobs"}
        if self.scoring == "prompt_logprobs":
            caps |= {"token_ranks"}  # vLLM reports each prompt token's rank with its log-probability
        self.capabilities = frozenset(caps)

    # ----------------------------------------------------------------- identity and rendering
    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer, loaded locally (server option `tokenizer`)."""
        if self.chat is None:
            raise UserError(f"{self.name}: this needs the model's tokenizer here (server option `tokenizer`)")
        return self.chat.tokenizer

    def fingerprint(self) -> dict[str, Any]:
        """The server and model name (the weights are the server's: a new model needs a new name), the local
        template, and how scores and samples are obtained. Never the API key."""
        return {
            "backend": "openai",
            "url": self.url,
            "model": self.model,
            "chat_template": self.chat.template_digest() if self.chat else "server",
            "scoring": self.scoring,
            "n_per_request": self.options.n_per_request,
            # only when off, so that the keys of every call stored before the option existed stay the same
            **({} if self.options.neutral_sampling else {"neutral_sampling": False}),
        }

    def missing_capabilities(self) -> dict[str, str]:
        """What this backend cannot do here, and why (shown in `maskscope models` and refusals)."""
        missing = {
            "support_logprobs": "servers return only the top log-probabilities, not full distributions",
            "position_logprobs": "servers return log-probabilities and ranks of given tokens, not the full "
            "distribution at every position (exact KL needs it)",
            "cuts": "forced answers and continuations from cuts of a sequence need the transformers engine",
            "activations": "servers do not expose activations",
            "steering": "stock OpenAI-compatible servers have no steering of activations (docs/directions.md)",
        }
        if self.chat is None:
            missing["score"] = "exact scoring needs the model's tokenizer here (server option `tokenizer`)"
        elif not self.scoring:
            missing["score"] = "the server returns no prompt log-probabilities (prompt_logprobs or echo)"
        if self.scoring != "prompt_logprobs":
            missing["token_ranks"] = (
                "token ranks need the server's prompt_logprobs (vLLM); echo gives no ranks"
            )
        return missing

    def render(self, context: Context) -> str:
        """The prompt: rendered with the local chat template when there is a tokenizer; otherwise the chat
        messages as canonical JSON (the server renders them; it is also the store's key)."""
        if self.chat is not None:
            return self.chat.render(context)
        ctx = Conversation.coerce(context)
        if isinstance(ctx, str):
            return ctx
        if ctx.prefill:
            raise UserError(
                "a prefill needs the prompt rendered locally: give the server option `tokenizer` "
                '(e.g. "hf:DIR" with the served model\'s tokenizer)'
            )
        return json.dumps(ctx.to_messages(), ensure_ascii=False, sort_keys=True)

    def request_stats(self) -> dict[str, Any]:
        """Requests sent (every attempt), retries and their causes, the concurrency and the top-logprobs
        limit used, and how exact scores were obtained."""
        return {
            **self.stats.to_json(),
            "concurrency": self.options.concurrency,
            "top_logprobs_limit": self.options.top_logprobs_limit,
            "scoring": self.scoring,
        }

    # ----------------------------------------------------------------- primitives
    def score_many(
        self, requests: Sequence[tuple[Context, Sequence[str]]]
    ) -> Iterator[tuple[int, int, Scored]]:
        """Exact teacher-forced scores, one request per continuation (vLLM's prefix cache shares the prompt)."""
        chat = self._scoring_chat("scoring")
        prompts, items = chat.encode_requests(requests)

        def one(k: int) -> list[float]:
            _, _, p, _, cont_ids = items[k]
            return self._prompt_logprobs(prompts[p], cont_ids)

        for k, logprobs in self._map(one, range(len(items))):
            r, j, _, cont, cont_ids = items[k]
            yield r, j, Scored(cont, cont_ids, chat.token_texts(cont_ids), logprobs)

    def token_logprobs(
        self, items: Sequence[tuple[Context, Sequence[int]]]
    ) -> Iterator[tuple[int, list[float]]]:
        """Exact log-probability of each of the given token ids after each context."""
        chat = self._scoring_chat("token log-probabilities")
        encoded = [(chat.encode_prompt(c), list(ids)) for c, ids in items]
        yield from self._map(lambda k: self._prompt_logprobs(*encoded[k]), range(len(encoded)))

    def token_ranks(
        self, items: Sequence[tuple[Context, Sequence[int]]]
    ) -> Iterator[tuple[int, dict[str, list[Any]]]]:
        """Each given token's exact log-probability and rank after each context, from the server's
        prompt_logprobs (rank 1: the most probable token; vLLM counts the tokens strictly more probable)."""
        chat = self._scoring_chat("token ranks")
        if self.scoring != "prompt_logprobs":
            raise UserError(f"token ranks over {self.url}: {self.missing_capabilities()['token_ranks']}")
        encoded = [(chat.encode_prompt(c), list(ids)) for c, ids in items]

        def one(k: int) -> dict[str, list[Any]]:
            prompt, cont = encoded[k]
            rows = self._prompt_rows(prompt, cont)
            entries = [row[str(t)] for row, t in zip(rows, cont, strict=True)]
            if any(e.get("rank") is None for e in entries):
                raise UserError(f"token ranks over {self.url}: the server's prompt_logprobs carry no ranks")
            return {
                "logprobs": [float(e["logprob"]) for e in entries],
                "ranks": [int(e["rank"]) for e in entries],
            }

        yield from self._map(one, range(len(encoded)))

    def next_token_distributions(
        self, contexts: Sequence[Context], top_k: int
    ) -> Iterator[tuple[int, TokenDist]]:
        """The top log-probabilities of the reply's first token, up to the server's limit."""
        k = min(top_k, self.options.top_logprobs_limit)

        def one(i: int) -> TokenDist:
            prompt = self._completion_prompt(contexts[i])
            if prompt is None:
                response = self._call(
                    lambda: self.client.chat.completions.create(
                        model=self.model,
                        messages=self._messages(contexts[i]),
                        max_tokens=1,
                        temperature=0.0,
                        logprobs=True,
                        top_logprobs=k,
                    )
                )
                top = {t.token: t.logprob for t in response.choices[0].logprobs.content[0].top_logprobs}
            else:
                response = self._call(
                    lambda: self.client.completions.create(
                        model=self.model, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=k
                    )
                )
                top = dict(response.choices[0].logprobs.top_logprobs[0])
            pairs = sorted(top.items(), key=lambda kv: -kv[1])[:k]
            tokens = [t for t, _ in pairs]
            return TokenDist(
                [self._token_id(t) for t in tokens],
                tokens,
                [float(lp) for _, lp in pairs],
                complete=len(pairs) >= top_k,
            )

        yield from self._map(one, range(len(contexts)))

    def sample_indices(
        self, context: Context, indices: Sequence[int], params: SampleParams
    ) -> Iterator[Sample]:
        """Samples with the given indices. Sample i is drawn with the seed sample_seed(seed, context, i) (with
        `n_per_request` = n > 1: request i // n draws samples i // n * n ... with one seed), so a resumed run
        draws only what it misses. A server's "stop" finish is reported as "eos" when no stop strings were
        given, else as "stop" (the API does not say which of the two ended the reply)."""
        n = self.options.n_per_request
        wanted = set(indices)
        groups = sorted({i // n for i in wanted})
        prompt = self._completion_prompt(context)
        messages = None if prompt is not None else self._messages(context)
        stream = stream_key(self.render(context))

        def one(g: int) -> list[Sample]:
            common: dict[str, Any] = {
                "model": self.model,
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": sample_seed(params.seed, stream, g) % 2**31,
                "stop": list(params.stop) or None,
                "n": n,
                "extra_body": NEUTRAL_SAMPLING if self.options.neutral_sampling else None,
            }
            if prompt is not None:
                response = self._call(lambda: self.client.completions.create(prompt=prompt, **common))
                texts = [(c.index, c.text, c.finish_reason) for c in response.choices]
            else:
                response = self._call(
                    lambda: self.client.chat.completions.create(messages=messages, **common)
                )
                texts = [(c.index, c.message.content or "", c.finish_reason) for c in response.choices]
            if len(texts) != n:
                raise UserError(
                    f"{self.url}: asked for n={n} samples per request, got {len(texts)}: the server does not "
                    "support n; use the server option n_per_request: 1"
                )
            out = []
            for c, text, finish in sorted(texts, key=lambda t: t[0]):
                reason = "length" if finish == "length" else ("stop" if params.stop else "eos")
                ids = self.chat.tokenizer(text, add_special_tokens=False)["input_ids"] if self.chat else []
                out.append(Sample(g * n + c, text, list(ids), reason))
            return out

        for _, samples in self._map(one, groups):
            for s in samples:
                if s.index in wanted:
                    yield s

    # ----------------------------------------------------------------- requests
    def _call(self, fn: Callable[[], T], *, retries: int | None = None) -> T:
        """One request with retries on 429, 5xx, connection errors and timeouts; any other error, or one
        that outlives its retries, becomes a one-line UserError. `retries` overrides `max_retries` (0 for
        probes, whose failure is an answer)."""
        max_retries = self.options.max_retries if retries is None else min(retries, self.options.max_retries)
        o = self.openai
        attempt = 0
        while True:
            self.stats.count()
            try:
                return fn()
            except (o.AuthenticationError, o.PermissionDeniedError) as e:
                raise UserError(
                    f"{self.url}: authentication failed (HTTP {e.status_code}); set {self.key_env} "
                    "to the server's API key"
                ) from None
            except o.NotFoundError as e:
                raise UserError(f"{self.url}: not found (HTTP 404): {_message(e)}") from None
            except (o.RateLimitError, o.InternalServerError, o.APIConnectionError) as e:
                cause, retry_after = _cause(e), _retry_after(e)
                if attempt >= max_retries or not self._take_retry():
                    what = "did not answer" if isinstance(e, o.APIConnectionError) else f"answered {cause}"
                    raise UserError(
                        f"{self.url}: the server {what} after {attempt + 1} tries ({_message(e)})"
                    ) from None
            except o.APIStatusError as e:
                raise UserError(
                    f"{self.url}: the server refused the request (HTTP {e.status_code}): {_message(e)}"
                ) from None
            self.stats.count(cause)
            delay = min(self.options.max_backoff, self.options.backoff * 2**attempt)
            time.sleep(max(retry_after or 0.0, random.uniform(0, delay)))  # full jitter
            attempt += 1

    def _take_retry(self) -> bool:
        with self.stats.lock:
            return self.stats.retries < self.options.retry_budget

    def _map(self, fn: Callable[[int], T], keys: Sequence[int] | range) -> Iterator[tuple[int, T]]:
        """fn(key) for every key, at most `concurrency` in flight; (key, result) yielded as each finishes.
        On the first error, requests not yet started are cancelled and the error is raised."""
        keys = list(keys)
        if not keys:
            return
        pool = ThreadPoolExecutor(max_workers=min(self.options.concurrency, len(keys)))
        try:
            pending: dict[Future[T], int] = {pool.submit(fn, k): k for k in keys}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    key = pending.pop(future)
                    yield key, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _resolve_model(self, model: str | None) -> str:
        # Few retries here: a wrong URL should be said at once, not after a minute of backoff.
        served = [m.id for m in self._call(lambda: self.client.models.list(), retries=2).data]
        if model is None:
            if len(served) == 1:
                return served[0]
            raise UserError(
                f"{self.url} serves {len(served)} models: name one as openai:URL#MODEL ({_few(served)})"
            )
        if model not in served:
            raise UserError(f"{self.url}: unknown model {model!r}; the server offers {_few(served)}")
        return model

    # ----------------------------------------------------------------- prompt log-probabilities
    def _probe_scoring(self) -> str | None:
        """Which way of getting prompt log-probabilities this server offers: "prompt_logprobs" (vLLM),
        "echo" (completions with echo and logprobs), or None. The probe prompt is a short chat, rendered with
        the template, like the prompts that get scored."""
        assert self.chat is not None
        prompt = self.chat.render(Conversation.of(system="Be brief.", user="Name a colour."))
        try:
            response = self._call(
                lambda: self.client.completions.create(
                    model=self.model,
                    prompt=self.chat.encode_prompt(prompt),
                    max_tokens=1,
                    temperature=0.0,
                    extra_body={"prompt_logprobs": 0},
                ),
                retries=0,  # llama.cpp answers a token-id prompt with HTTP 500
            )
            if getattr(response.choices[0], "prompt_logprobs", None):
                return "prompt_logprobs"
        except UserError:
            pass
        return "echo" if self._echo_agrees(prompt) else None

    def _echo_agrees(self, prompt: str) -> bool:
        """Whether the server's echo is aligned for prompts like this one: the echoed log-probability of a
        token must equal the one reported when the same token was generated after the prompt. (llama-cpp-
        python's server, for one, shifts echoed log-probabilities by one position when the prompt does not
        begin with the model's BOS token.)"""
        try:
            first = self._call(
                lambda: self.client.completions.create(
                    model=self.model, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=1
                )
            )
            generated = first.choices[0].logprobs.token_logprobs[0]
            token = self._single_token(first.choices[0].text)
            if generated is None or token is None:
                return False
            echoed = self._echo_logprobs(prompt + first.choices[0].text, [token])
        except (UserError, AttributeError, IndexError, TypeError):
            return False
        return abs(echoed[0] - generated) <= ECHO_TOLERANCE

    def _prompt_logprobs(self, prompt: Sequence[int], cont: Sequence[int]) -> list[float]:
        """Log-probabilities of the continuation ids after the prompt ids."""
        assert self.chat is not None
        ids = list(prompt) + list(cont)
        if self.scoring == "prompt_logprobs":
            rows = self._prompt_rows(prompt, cont)
            return [float(row[str(t)]["logprob"]) for row, t in zip(rows, cont, strict=True)]
        text = self._text(ids)
        if not self._templated(prompt):
            if self._raw_echo is None:
                self._raw_echo = self._echo_agrees(self._text(prompt))
            if not self._raw_echo:
                raise UserError(
                    f"{self.url}: the server's echoed log-probabilities are misaligned for prompts without the "
                    "chat template (they were checked against generated ones): score chat contexts"
                )
        return self._echo_logprobs(text, list(cont))

    def _prompt_rows(self, prompt: Sequence[int], cont: Sequence[int]) -> list[Any]:
        """The server's prompt_logprobs entries ({token id: {logprob, rank, ...}}) of the continuation's
        positions."""
        ids = list(prompt) + list(cont)
        response = self._call(
            lambda: self.client.completions.create(
                model=self.model,
                prompt=ids,
                max_tokens=1,
                temperature=0.0,
                extra_body={"prompt_logprobs": 0},
            )
        )
        return list(response.choices[0].prompt_logprobs[len(prompt) :])

    def _templated(self, prompt: Sequence[int]) -> bool:
        """Whether a prompt begins like the chat template's prompts (the probe's kind)."""
        assert self.chat is not None
        if self._template_start is None:
            self._template_start = self.chat.encode_prompt(Conversation.of(user="x"))[0]
        return bool(prompt) and prompt[0] == self._template_start

    def _echo_logprobs(self, text: str, cont: list[int]) -> list[float]:
        """Echo of prompt + continuation as text. The continuation's log-probabilities are the last ones
        before the generated token (if any); the server's token texts there must be the local tokenizer's,
        or the server split the text differently and the numbers would belong to other tokens."""
        assert self.chat is not None
        response = self._call(
            lambda: self.client.completions.create(
                model=self.model, prompt=text, max_tokens=1, temperature=0.0, logprobs=0, echo=True
            )
        )
        choice = response.choices[0]
        generated = 1 if (choice.text or "")[len(text) :] else 0  # an end-of-sequence adds no entry
        tokens = list(choice.logprobs.tokens)[: len(choice.logprobs.tokens) - generated]
        values = list(choice.logprobs.token_logprobs)[: len(tokens)]
        got, expected = tokens[len(tokens) - len(cont) :], self.chat.token_texts(cont)
        if len(tokens) <= len(cont) or any(
            g != w for g, w in zip(got, expected, strict=True) if "\ufffd" not in w
        ):
            raise UserError(
                f"{self.url}: the server split the text into other tokens than the local tokenizer "
                f"({got!r} against {expected!r}): check that `tokenizer` is the served model's"
            )
        out = values[-len(cont) :]
        if any(v is None for v in out):
            raise UserError(f"{self.url}: the server returned no log-probability for a continuation token")
        return [float(v) for v in out]

    # ----------------------------------------------------------------- helpers
    def _scoring_chat(self, what: str) -> ChatTokenizer:
        if self.chat is None or not self.scoring:
            raise UserError(f"{what} over {self.url}: {self.missing_capabilities()['score']}")
        return self.chat

    def _completion_prompt(self, context: Context) -> str | None:
        """The prompt text for the completions endpoint, or None to use the chat endpoint."""
        ctx = Conversation.coerce(context)
        if isinstance(ctx, str) or self.chat is not None:
            return self.render(ctx)
        self.render(ctx)  # refuses a prefill
        return None

    def _messages(self, context: Context) -> list[dict[str, str]]:
        ctx = Conversation.coerce(context)
        assert isinstance(ctx, Conversation)
        return ctx.to_messages()

    def _text(self, ids: Sequence[int]) -> str:
        """Token ids back to the text the server will tokenize (special tokens kept as text)."""
        assert self.chat is not None
        return self.chat.tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)

    def _single_token(self, text: str) -> int | None:
        if self.chat is None:
            return None
        ids = self.chat.tokenizer(text, add_special_tokens=False)["input_ids"]
        return int(ids[0]) if len(ids) == 1 else None

    def _token_id(self, text: str) -> int:
        """The id of a token the server named by its text (-1 when there is no tokenizer or it is not one token)."""
        found = self._single_token(text)
        return -1 if found is None else found


def _message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        msg = body.get("message") or body.get("detail") or body.get("error") or body
    else:
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
    return " ".join(str(msg).split())[:300]


def _cause(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    return "timeout" if "Timeout" in type(e).__name__ else "connection error"


def _retry_after(e: Exception) -> float | None:
    response = getattr(e, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None


def _few(names: Sequence[str]) -> str:
    return (
        ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "none"
    )


def load_openai(
    rest: str, options: ServerOptions | None = None, credentials: Credentials | None = None
) -> OpenAIModel:
    """``URL#MODEL`` into a connected OpenAIModel, with the local tokenizer when the options name one."""
    from maskscope.models.loading import load_tokenizer

    url, model = parse_name(rest)
    credentials = credentials or Credentials()
    check_transport(url, credentials.key()[0], credentials)  # before anything is loaded or sent
    options = options or ServerOptions()
    chat = load_tokenizer(options.tokenizer) if options.tokenizer else None
    return OpenAIModel(url, model, options, chat=chat, credentials=credentials)


__all__ = [
    "Credentials",
    "OpenAIModel",
    "ServerOptions",
    "check_transport",
    "load_openai",
    "parse_name",
    "redact_model_name",
    "redact_url",
]
