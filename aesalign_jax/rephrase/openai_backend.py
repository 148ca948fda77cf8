"""The `openai` rephraser: any OpenAI-compatible /v1/chat/completions endpoint (OpenAI, vLLM,
llama.cpp server, Ollama, TGI...), through aesalign_jax.openai_client.

- base_url is the API root including its version, e.g. https://api.openai.com/v1 or
  http://localhost:8000/v1; requests go to {base_url}/chat/completions.
- The API key is read from the environment variable NAMED in config (api_key_env); it is sent
  only in the Authorization header, and removed from every message this module logs or
  returns (an endpoint may echo it in an error body). It is never written to the cache.
- Each query is one request with timeout_s per socket operation. 429, 5xx, timeouts and
  connection errors are retried up to max_retries times with exponential backoff
  (backoff_s * 2^attempt, with jitter), or after the server's Retry-After when it sends one;
  every wait is capped at max_backoff_s. Other 4xx and malformed answers are not retried;
  redirects are refused (they would carry the key elsewhere).
- At most max_concurrency requests are in flight (a thread pool).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence

from aesalign_jax.openai_client import OpenAIClient, OpenAIError, check_at_least
from aesalign_jax.rephrase import prompts
from aesalign_jax.rephrase.core import Attempt


class OpenAIBackend:
  """Backend `openai`: chat completions from an OpenAI-compatible endpoint."""

  name = "openai"
  cacheable = True

  def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
               timeout_s: float = 30.0, max_retries: int = 3, backoff_s: float = 1.0,
               max_backoff_s: float = 30.0, max_concurrency: int = 8,
               max_new_tokens: int = 64, temperature: float = 0.0, k: int = 3):
    self.client = OpenAIClient(base_url, model, api_key_env=api_key_env, timeout_s=timeout_s,
                               max_retries=max_retries, backoff_s=backoff_s,
                               max_backoff_s=max_backoff_s, section="rephrase",
                               who="the openai backend")
    check_at_least("rephrase", (("max_concurrency", max_concurrency, 1),
                                ("max_new_tokens", max_new_tokens, 1)))
    self.model = model
    self.max_concurrency = int(max_concurrency)
    self.max_new_tokens = int(max_new_tokens)
    self.temperature = float(temperature)
    self.k = int(k)

  def __repr__(self) -> str:
    return f"OpenAIBackend(url={self.client.url!r}, model={self.model!r})"

  def complete(self, queries: Sequence[str], style: str) -> list[Attempt]:
    """One request per query, at most max_concurrency at a time."""
    workers = max(1, min(self.max_concurrency, len(queries)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="rephrase") as pool:
      return list(pool.map(lambda q: self._one(q, style), queries))

  def _one(self, query: str, style: str) -> Attempt:
    request = dict(model=self.model, messages=prompts.chat_messages(style, query, self.k),
                   temperature=self.temperature, max_tokens=self.max_new_tokens, n=1)
    try:
      answer = self.client.chat(request, label=f"rephrase request for {query!r}")
    except OpenAIError as e:  # never stop the run for one query
      return Attempt(None, str(e))
    text = prompts.parse_answer(answer, style)
    return Attempt(text, "" if text else "empty or refused answer")
