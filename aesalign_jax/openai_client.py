"""One client for OpenAI-compatible /v1/chat/completions endpoints (OpenAI, vLLM, llama.cpp
server, Ollama, TGI...), through the standard library only. The openai rephraser
(rephrase/openai_backend.py) and the openai judge (evaluation/judge_openai.py) both use it.

- base_url is the API root including its version, e.g. https://api.openai.com/v1 or
  http://localhost:8000/v1; requests go to {base_url}/chat/completions.
- The API key is read from the environment variable NAMED in config (api_key_env); it is sent
  only in the Authorization header, and removed from every message this module logs or
  raises (an endpoint may echo it in an error body); no repr shows it.
- Each request has timeout_s per socket operation. 429, 408, 409, 5xx, timeouts and
  connection errors are retried up to max_retries times with exponential backoff
  (backoff_s * 2^attempt, with jitter), or after the server's Retry-After when it sends one;
  every wait is capped at max_backoff_s. Other 4xx and malformed answers are not retried;
  redirects are refused (they would carry the key elsewhere).
- A request that fails for good raises OpenAIError (redacted message and body snippet).
- One client serves concurrent calls from several threads; callers bound the concurrency.

Usage:
  client = OpenAIClient(base_url, model, api_key_env="OPENAI_API_KEY")
  text = client.chat({"model": client.model, "messages": [...]})   # or raises OpenAIError
"""

from __future__ import annotations

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
from collections.abc import Mapping

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
SNIPPET_CHARS = 200   # how much of an error body or answer a message quotes


class OpenAIError(Exception):
  """A chat request that failed; str(error) is the redacted reason.

  status: the HTTP status of the last failure, or None (timeout, connection failure,
  malformed answer); retryable: whether the last failure was of a kind worth another try
  (raised by chat only once the retries ran out); attempts: requests sent; snippet: the start
  of the error body or malformed answer, redacted ('' when none); retry_after: the server's
  Retry-After in seconds, or None.
  """

  def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
               attempts: int = 1, snippet: str = "", retry_after: float | None = None):
    super().__init__(message)
    self.status = status
    self.retryable = retryable
    self.attempts = attempts
    self.snippet = snippet
    self.retry_after = retry_after


class _NoRedirect(urllib.request.HTTPRedirectHandler):
  """Refuses redirects: urllib would resend the Authorization header to the new location."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    return None  # the 30x surfaces as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


class OpenAIClient:
  """POSTs chat-completion requests to one endpoint and model, with retries (module docstring).

  section and who name the caller in configuration errors, e.g. section='rephrase',
  who='the openai backend' -> "rephrase.base_url is empty; the openai backend needs ...";
  model_hint ends the message about an empty model name (e.g. ' (one that accepts images)').
  """

  def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
               timeout_s: float = 30.0, max_retries: int = 3, backoff_s: float = 1.0,
               max_backoff_s: float = 30.0, section: str = "openai",
               who: str = "the openai client", model_hint: str = ""):
    if not base_url:
      raise ValueError(f"{section}.base_url is empty; {who} needs the endpoint's API root, "
                       "e.g. http://localhost:8000/v1")
    if not model:
      raise ValueError(f"{section}.model is empty; {who} needs the endpoint's model "
                       f"name{model_hint}")
    if not timeout_s > 0:
      raise ValueError(f"{section}.timeout_s must be > 0; got {timeout_s}")
    check_at_least(section, (("max_retries", max_retries, 0), ("backoff_s", backoff_s, 0),
                             ("max_backoff_s", max_backoff_s, 0)))
    self._key = ""
    if api_key_env:
      self._key = os.environ.get(api_key_env, "")
      if not self._key:
        raise ValueError(f"{section}.api_key_env names the environment variable "
                         f"{api_key_env!r}, which is not set or empty; set it, or set "
                         f"{section}.api_key_env to '' for an endpoint without a key")
    base = base_url.rstrip("/")
    self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
    self.model = model
    self.timeout_s = float(timeout_s)
    self.max_retries = int(max_retries)
    self.backoff_s = float(backoff_s)
    self.max_backoff_s = float(max_backoff_s)

  def __repr__(self) -> str:
    return f"OpenAIClient(url={self.url!r}, model={self.model!r})"

  def redact(self, text: str) -> str:
    """`text` with the API key replaced by '***'."""
    return text.replace(self._key, "***") if self._key else text

  def chat(self, request: Mapping, *, label: str = "request") -> str | None:
    """choices[0].message.content of the answer to `request` (a chat-completions body), or
    None when the endpoint's content filter stopped it; raises OpenAIError when the request
    failed for good. `label` names the request in the retry log lines."""
    body = json.dumps(request).encode("utf-8")
    tries = 0
    while True:
      tries += 1
      try:
        return self._send(body)
      except OpenAIError as e:
        e.attempts = tries
        if not e.retryable:
          raise
        if tries > self.max_retries:
          raise OpenAIError(f"{e} (gave up after {tries} tr{'y' if tries == 1 else 'ies'})",
                            status=e.status, retryable=True, attempts=tries,
                            snippet=e.snippet) from None
        wait = self._wait(tries - 1, e.retry_after)
        logger.info("%s: %s; retry %d/%d in %.2f s", self.redact(label), e, tries,
                    self.max_retries, wait)
        time.sleep(wait)
      except Exception as e:  # pylint: disable=broad-except  # unforeseen: a final failure
        raise self._error(f"{type(e).__name__}: {e}", attempts=tries) from None

  def _wait(self, attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
      return min(max(retry_after, 0.0), self.max_backoff_s)
    return min(self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0), self.max_backoff_s)

  def _error(self, message: str, *, raw: bytes | None = None, **fields) -> OpenAIError:
    """An OpenAIError whose message and snippet have the key redacted."""
    return OpenAIError(self.redact(message), snippet=self.redact(snippet(raw or b"")),
                       **fields)

  def _send(self, body: bytes) -> str | None:
    """One request: the answer's text; raises OpenAIError (retryable or not)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self._key:
      headers["Authorization"] = f"Bearer {self._key}"
    request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
    timed_out = f"timed out after {self.timeout_s:g} s"
    try:
      with _OPENER.open(request, timeout=self.timeout_s) as response:
        raw = response.read()
    except urllib.error.HTTPError as e:
      raw = e.read() if e.fp else b""
      detail = snippet(raw)
      retryable = e.code in RETRY_STATUS
      raise self._error(
          f"HTTP {e.code} {e.reason}{': ' + detail if detail else ''}", raw=raw, status=e.code,
          retryable=retryable,
          retry_after=_retry_after(e.headers.get("Retry-After")) if retryable else None
      ) from None
    except (TimeoutError, socket.timeout):
      raise self._error(timed_out, retryable=True) from None
    except urllib.error.URLError as e:
      if isinstance(e.reason, (TimeoutError, socket.timeout)):
        raise self._error(timed_out, retryable=True) from None
      raise self._error(f"connection failed: {e.reason}", retryable=True) from None
    except (ConnectionError, http.client.HTTPException) as e:
      raise self._error(f"connection failed: {type(e).__name__}: {e}", retryable=True) from None
    try:
      return answer_text(raw)
    except OpenAIError as e:
      raise self._error(str(e), raw=raw) from None


def answer_text(raw: bytes) -> str | None:
  """choices[0].message.content of a chat completion (content parts joined; None when a
  content filter stopped it); raises OpenAIError when malformed."""
  try:
    payload = json.loads(raw.decode("utf-8"))
    choice = payload["choices"][0]
    content = choice["message"].get("content")
  except (ValueError, KeyError, IndexError, TypeError, AttributeError):
    raise OpenAIError(f"malformed response: {snippet(raw)!r}") from None
  if choice.get("finish_reason") == "content_filter":
    return None
  if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
  if content is not None and not isinstance(content, str):
    raise OpenAIError(f"malformed response: content is a {type(content).__name__}")
  return content


def snippet(raw: bytes) -> str:
  """The start of a body as one line of text, at most SNIPPET_CHARS characters (then '...')."""
  text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
  return text[:SNIPPET_CHARS] + ("..." if len(text) > SNIPPET_CHARS else "")


def check_at_least(section: str, checks) -> None:
  """Raises ValueError '{section}.{key} must be >= {low}; got {value}' for the first
  (key, value, low) of `checks` whose value is not >= low (NaN included)."""
  for key, value, low in checks:
    if not value >= low:
      raise ValueError(f"{section}.{key} must be >= {low}; got {value}")


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
