"""The shared OpenAI-compatible client against a loopback server that answers from a script:
retries then success, retries exhausted, no retry on other 4xx, backoff and Retry-After, and
the API key kept out of errors, reprs and logs."""

import email.utils
import http.server
import json
import logging
import threading
import time
import types

import pytest

from aesalign_jax import openai_client
from aesalign_jax.openai_client import OpenAIClient, OpenAIError
from loopback import chat_answer, send_json, serving

KEY_ENV = "AESALIGN_TEST_CLIENT_KEY"
KEY = "sk-client-test-0a1b2c3d-secret"
REQUEST = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


class ScriptedLLM(http.server.ThreadingHTTPServer):
  """Answers request n with script[n] (the last entry repeats): (status, body, headers).
  A body of None is a chat answer 'fine'; 'ECHO' is replaced by the Authorization header."""

  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.script = [(200, None, {})]
    self.requests = []
    self.lock = threading.Lock()

  @property
  def base_url(self):
    return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):
    pass

  def do_POST(self):
    server = self.server
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with server.lock:
      n = len(server.requests)
      server.requests.append((self.path, self.headers.get("Authorization"), body))
    status, payload, headers = server.script[min(n, len(server.script) - 1)]
    if payload is None:
      payload = chat_answer("fine")
    payload = payload.replace(b"ECHO", str(self.headers.get("Authorization")).encode())
    send_json(self, status, payload, headers)


@pytest.fixture
def server(monkeypatch):
  with serving(ScriptedLLM(), monkeypatch, KEY_ENV, KEY) as srv:
    yield srv


@pytest.fixture
def sleeps(monkeypatch):
  """Records the client's waits instead of sleeping."""
  waits = []
  monkeypatch.setattr(openai_client, "time",
                      types.SimpleNamespace(sleep=waits.append, time=time.time))
  return waits


def _client(server, **overrides):
  kwargs = dict(api_key_env=KEY_ENV, timeout_s=2.0, max_retries=2, backoff_s=0.01,
                max_backoff_s=0.05)
  kwargs.update(overrides)
  return OpenAIClient(server.base_url, "tiny-chat", **kwargs)


def test_retryable_failures_are_retried_until_success(server, sleeps, caplog):
  caplog.set_level(logging.INFO)
  server.script = [(429, b'{"error": "slow down"}', {}), (503, b"busy", {}),
                   (200, None, {})]
  assert _client(server).chat(REQUEST, label="test request") == "fine"
  assert len(server.requests) == 3 and len(sleeps) == 2
  path, auth, body = server.requests[0]
  assert (path, auth, body) == ("/v1/chat/completions", f"Bearer {KEY}", REQUEST)
  assert "test request: HTTP 429" in caplog.text and "retry 2/2" in caplog.text


def test_exhausted_retries_raise_a_final_error(server, sleeps):
  server.script = [(500, b'{"error": "down for maintenance"}', {})]
  with pytest.raises(OpenAIError) as info:
    _client(server, max_retries=3).chat(REQUEST)
  e = info.value
  assert len(server.requests) == 4 and len(sleeps) == 3
  assert (e.status, e.retryable, e.attempts) == (500, True, 4)
  assert str(e).startswith("HTTP 500") and str(e).endswith("(gave up after 4 tries)")
  assert "down for maintenance" in e.snippet
  server.requests.clear()
  with pytest.raises(OpenAIError, match=r"gave up after 1 try\)"):
    _client(server, max_retries=0).chat(REQUEST)
  assert len(server.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_other_4xx_are_not_retried(server, sleeps, status):
  server.script = [(status, b'{"error": "no"}', {}), (200, None, {})]
  with pytest.raises(OpenAIError) as info:
    _client(server).chat(REQUEST)
  assert len(server.requests) == 1 and sleeps == []
  assert (info.value.status, info.value.retryable, info.value.attempts) == (status, False, 1)
  assert "gave up" not in str(info.value)


def test_malformed_answers_and_redirects_are_final(server, sleeps):
  server.script = [(200, b'{"choices": []}', {})]
  with pytest.raises(OpenAIError, match="malformed response") as info:
    _client(server).chat(REQUEST)
  assert info.value.status is None and info.value.snippet == '{"choices": []}'
  server.script = [(302, b"", {"Location": "http://127.0.0.2:9/steal"})]
  with pytest.raises(OpenAIError, match="HTTP 302"):
    _client(server).chat(REQUEST)
  assert len(server.requests) == 2 and sleeps == []
  server.script = [(200, chat_answer("", "content_filter"), {})]
  assert _client(server).chat(REQUEST) is None


def test_backoff_doubles_with_jitter_and_retry_after_wins_within_the_cap(server, sleeps):
  server.script = [(503, b"", {})]
  with pytest.raises(OpenAIError):
    _client(server, max_retries=5, backoff_s=1.0, max_backoff_s=5.0).chat(REQUEST)
  for attempt, wait in enumerate(sleeps):
    assert min(2 ** attempt * 0.5, 5.0) <= wait <= min(2 ** attempt, 5.0), (attempt, wait)
  assert len(sleeps) == 5 and sleeps[-1] == 5.0   # 16 s * [0.5, 1], capped
  sleeps.clear()
  server.requests.clear()
  later = email.utils.formatdate(time.time() + 100, usegmt=True)
  server.script = [(429, b"", {"Retry-After": "0.7"}), (429, b"", {"Retry-After": later}),
                   (200, None, {})]
  assert _client(server, max_backoff_s=3.0).chat(REQUEST) == "fine"
  assert sleeps == [0.7, 3.0]


def test_the_key_is_sent_but_never_in_errors_reprs_or_logs(server, sleeps, caplog, capsys):
  caplog.set_level(logging.DEBUG)
  client = _client(server)
  server.script = [(503, b'{"error": "bad ECHO"}', {}), (401, b'{"error": "bad ECHO"}', {})]
  with pytest.raises(OpenAIError) as info:
    client.chat(REQUEST)
  server.script = [(500, b'{"error": "bad ECHO"}', {})]
  with pytest.raises(OpenAIError) as exhausted:
    client.chat(REQUEST)
  assert {auth for _, auth, _ in server.requests} == {f"Bearer {KEY}"}   # it was sent...
  assert "***" in str(info.value) and "***" in exhausted.value.snippet
  captured = capsys.readouterr()
  for e in (info.value, exhausted.value):
    for text in (str(e), repr(e), repr(e.args), e.snippet):
      assert KEY not in text                                             # ...and nowhere else
  for text in (caplog.text, captured.out, captured.err, repr(client)):
    assert KEY not in text
  assert "retry" in caplog.text


def test_configuration_errors_name_the_section(server, monkeypatch):
  with pytest.raises(ValueError, match=r"judge\.base_url is empty; the judge needs"):
    OpenAIClient("", "m", api_key_env="", section="judge", who="the judge")
  with pytest.raises(ValueError, match=r"x\.model is empty.*model name \(vision\)"):
    OpenAIClient(server.base_url, "", api_key_env="", section="x", model_hint=" (vision)")
  for key, value in (("timeout_s", dict(timeout_s=0)), ("max_retries", dict(max_retries=-1)),
                     ("backoff_s", dict(backoff_s=float("nan")))):
    with pytest.raises(ValueError, match=f"x.{key}"):
      OpenAIClient(server.base_url, "m", api_key_env="", section="x", **value)
  monkeypatch.delenv(KEY_ENV)
  with pytest.raises(ValueError, match=f"x.api_key_env names the environment variable "
                                       f"'{KEY_ENV}'"):
    OpenAIClient(server.base_url, "m", api_key_env=KEY_ENV, section="x")
  assert OpenAIClient(server.base_url, "m", api_key_env="").chat(REQUEST) == "fine"
  assert server.requests[-1][1] is None   # no key: no Authorization header


def test_unreachable_endpoints_fail_after_the_retries(server, sleeps):  # server: no proxy
  client = OpenAIClient("http://127.0.0.1:9/v1", "m", api_key_env="", max_retries=1)
  with pytest.raises(OpenAIError, match=r"connection failed.*gave up after 2 tries"):
    client.chat(REQUEST)
  assert len(sleeps) == 1
