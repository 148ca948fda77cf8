"""The `openai` rephraser: any OpenAI-compatible /v1/chat/completions endpoint (OpenAI, vLLM,
llama.cpp server, Ollama, TGI...), through the standard library only.

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
import email.utils
import http.client
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

from aesalign_jax.rephrase import prompts
from aesalign_jax.rephrase.core import Attempt

logger = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_BODY_CHARS = 200   # how much of an error body a reason quotes


class _NoRedirect(urllib.request.HTTPRedirectHandler):
  """Refuses redirects: urllib would resend the Authorization header to the new location."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    return None  # the 30x surfaces as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


class _Retryable(Exception):
  """A failure worth another try; `wait` is the server's Retry-After, if any."""

  def __init__(self, message: str, wait: float | None = None):
    super().__init__(message)
    self.wait = wait


class _Final(Exception):
  """A failure that another try will not fix."""


class OpenAIBackend:
  """Backend `openai`: chat completions from an OpenAI-compatible endpoint."""

  name = "openai"
  cacheable = True

  def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
               timeout_s: float = 30.0, max_retries: int = 3, backoff_s: float = 1.0,
               max_backoff_s: float = 30.0, max_concurrency: int = 8,
               max_new_tokens: int = 64, temperature: float = 0.0, k: int = 3):
    if not base_url:
      raise ValueError("rephrase.base_url is empty; the openai backend needs the endpoint's "
                       "API root, e.g. http://localhost:8000/v1")
    if not model:
      raise ValueError("rephrase.model is empty; the openai backend needs the endpoint's model "
                       "name")
    if not timeout_s > 0:
      raise ValueError(f"rephrase.timeout_s must be > 0; got {timeout_s}")
    for key, value, low in (("max_concurrency", max_concurrency, 1),
                            ("max_retries", max_retries, 0), ("backoff_s", backoff_s, 0),
                            ("max_backoff_s", max_backoff_s, 0),
                            ("max_new_tokens", max_new_tokens, 1)):
      if value < low:
        raise ValueError(f"rephrase.{key} must be >= {low}; got {value}")
    self._key = ""
    if api_key_env:
      self._key = os.environ.get(api_key_env, "")
      if not self._key:
        raise ValueError(f"rephrase.api_key_env names the environment variable {api_key_env!r}, "
                         "which is not set or empty; set it, or set rephrase.api_key_env to '' "
                         "for an endpoint without a key")
    base = base_url.rstrip("/")
    self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
    self.model = model
    self.timeout_s = float(timeout_s)
    self.max_retries = int(max_retries)
    self.backoff_s = float(backoff_s)
    self.max_backoff_s = float(max_backoff_s)
    self.max_concurrency = int(max_concurrency)
    self.max_new_tokens = int(max_new_tokens)
    self.temperature = float(temperature)
    self.k = int(k)

  def __repr__(self) -> str:
    return f"OpenAIBackend(url={self.url!r}, model={self.model!r})"

  def redact(self, text: str) -> str:
    """`text` with the API key replaced by '***'."""
    return text.replace(self._key, "***") if self._key else text

  def complete(self, queries: Sequence[str], style: str) -> list[Attempt]:
    """One request per query, at most max_concurrency at a time."""
    workers = max(1, min(self.max_concurrency, len(queries)))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="rephrase") as pool:
      return list(pool.map(lambda q: self._one(q, style), queries))

  def _one(self, query: str, style: str) -> Attempt:
    body = json.dumps(dict(model=self.model, messages=prompts.chat_messages(style, query, self.k),
                           temperature=self.temperature, max_tokens=self.max_new_tokens,
                           n=1)).encode("utf-8")
    reason = ""
    for attempt in range(self.max_retries + 1):
      try:
        answer = self._post(body)
      except _Retryable as e:
        reason = self.redact(str(e))
        if attempt == self.max_retries:
          break
        wait = self._wait(attempt, e.wait)
        logger.info("rephrase request for %r: %s; retry %d/%d in %.2f s", query, reason,
                    attempt + 1, self.max_retries, wait)
        time.sleep(wait)
        continue
      except _Final as e:
        return Attempt(None, self.redact(str(e)))
      except Exception as e:  # pylint: disable=broad-except  # never stop the run for one query
        return Attempt(None, self.redact(f"{type(e).__name__}: {e}"))
      text = prompts.parse_answer(answer, style)
      return Attempt(text, "" if text else "empty or refused answer")
    tries = self.max_retries + 1
    return Attempt(None, f"{reason} (gave up after {tries} tr{'y' if tries == 1 else 'ies'})")

  def _wait(self, attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
      return min(max(retry_after, 0.0), self.max_backoff_s)
    return min(self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0), self.max_backoff_s)

  def _post(self, body: bytes) -> str | None:
    """The answer's text; raises _Retryable or _Final."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._key:
      headers["Authorization"] = f"Bearer {self._key}"
    request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
    try:
      with _OPENER.open(request, timeout=self.timeout_s) as response:
        raw = response.read()
    except urllib.error.HTTPError as e:
      detail = _snippet(e.read() if e.fp else b"")
      message = f"HTTP {e.code} {e.reason}{': ' + detail if detail else ''}"
      if e.code in _RETRY_STATUS:
        raise _Retryable(message, _retry_after(e.headers.get("Retry-After"))) from None
      raise _Final(message) from None
    except (TimeoutError, socket.timeout):
      raise _Retryable(f"timed out after {self.timeout_s:g} s") from None
    except urllib.error.URLError as e:
      if isinstance(e.reason, (TimeoutError, socket.timeout)):
        raise _Retryable(f"timed out after {self.timeout_s:g} s") from None
      raise _Retryable(f"connection failed: {e.reason}") from None
    except (ConnectionError, http.client.HTTPException) as e:
      raise _Retryable(f"connection failed: {type(e).__name__}: {e}") from None
    return _answer_text(raw)


def _answer_text(raw: bytes) -> str | None:
  """choices[0].message.content of a chat completion; raises _Final when malformed."""
  try:
    payload = json.loads(raw.decode("utf-8"))
    choice = payload["choices"][0]
    content = choice["message"].get("content")
  except (ValueError, KeyError, IndexError, TypeError, AttributeError):
    raise _Final(f"malformed response: {_snippet(raw)!r}") from None
  if choice.get("finish_reason") == "content_filter":
    return None
  if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
  if content is not None and not isinstance(content, str):
    raise _Final(f"malformed response: content is a {type(content).__name__}")
  return content


def _snippet(raw: bytes) -> str:
  text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
  return text[:_BODY_CHARS] + ("..." if len(text) > _BODY_CHARS else "")


def _retry_after(value: str | None) -> float | None:
  """Seconds from a Retry-After header (a number or an HTTP date), or None."""
  if not value:
    return None
  try:
    return float(value)
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return when.timestamp() - time.time() if when else None
