"""The openai rephraser against a loopback OpenAI-compatible server started by the test: success,
retries on 429 and 5xx, timeouts, malformed answers, bounded concurrency, and the API key kept
out of logs, results and the cache."""

import collections
import http.server
import json
import logging
import threading
import time

import pytest

from aesalign_jax import rephrase
from loopback import chat_answer, send_json, serving

KEY_ENV = "AESALIGN_TEST_LLM_KEY"
KEY = "sk-test-9f8e7d6c5b4a-secret"
TIMEOUT_S = 0.5


class FakeLLM(http.server.ThreadingHTTPServer):
  """Answers by the query's first word: 'ok' succeeds; 'rate' gets a 429 first; 'down' is
  always 500; 'hang' never answers in time; 'garbled' gets malformed JSON; 'empty' a refusal;
  'echo' a 401 whose body repeats the Authorization header; 'moved' a redirect elsewhere;
  'slow' succeeds after 0.1 s."""

  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.calls = collections.Counter()
    self.auth = set()
    self.retry_after = "0"
    self.in_flight = self.max_in_flight = 0
    self.lock = threading.Lock()
    self.release = threading.Event()

  @property
  def base_url(self):
    return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):  # keep the test output quiet
    pass

  def do_POST(self):
    server = self.server
    with server.lock:
      server.in_flight += 1
      server.max_in_flight = max(server.max_in_flight, server.in_flight)
    try:
      self._answer(server)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client gave up (timeout)
    finally:
      with server.lock:
        server.in_flight -= 1

  def _answer(self, server):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    assert self.path == "/v1/chat/completions"
    query = body["messages"][-1]["content"].rsplit("Query: ", 1)[1]
    with server.lock:
      server.calls[query] += 1
      count = server.calls[query]
      server.auth.add(self.headers.get("Authorization"))
    kind = query.split()[0]
    if kind == "hang":
      server.release.wait(5)
      return
    if kind == "slow":
      time.sleep(0.1)
    if kind == "down" or (kind == "rate" and count == 1):
      status = 500 if kind == "down" else 429
      return self._send(status, b'{"error": "try later"}', {"Retry-After": server.retry_after})
    if kind == "echo":
      return self._send(401, json.dumps({"error": f"bad key {self.headers['Authorization']}"})
                        .encode())
    if kind == "moved":
      return self._send(302, b"", {"Location": "http://127.0.0.2:9/steal"})
    if kind == "garbled":
      return self._send(200, b'{"choices": [{"message": {"content": "trunc')
    if kind == "empty":
      content = "I'm sorry, I can't help with that."
    else:
      content = f'Sure! Here is the rephrased query:\n\n"{query}, soft light"\n\nIt adds light.'
    self._send(200, chat_answer(content))

  def _send(self, status, payload, headers=()):
    send_json(self, status, payload, headers)


@pytest.fixture
def server(monkeypatch):
  with serving(FakeLLM(), monkeypatch, KEY_ENV, KEY) as srv:
    yield srv


def _config(server, **overrides):
  c = rephrase.default_config()
  c.update(dict(backend="openai", base_url=server.base_url, model="tiny-chat",
                api_key_env=KEY_ENV, timeout_s=TIMEOUT_S, max_retries=2, backoff_s=0.01,
                max_backoff_s=0.2, max_concurrency=4, style="detail"))
  c.update(overrides)
  return c


def test_openai_success_retries_and_fallbacks(server, tmp_path, caplog):
  caplog.set_level(logging.DEBUG)
  queries = ["ok a red cat", "rate a blue star", "down a green square", "hang a dotted circle",
             "garbled a striped star", "empty a big cat", "ok a small dog"]
  rephraser = rephrase.make_rephraser(_config(server), cache_path=str(tmp_path / "c.jsonl"))
  start = time.perf_counter()
  result = rephraser.rephrase_batch(queries)
  elapsed = time.perf_counter() - start
  by_query = dict(zip(queries, zip(result.texts, result.status, result.reasons)))

  assert by_query["ok a red cat"] == ("ok a red cat, soft light", "ok", "")
  assert by_query["ok a small dog"][:2] == ("ok a small dog, soft light", "ok")
  # 429 then success: retried once.
  assert by_query["rate a blue star"][:2] == ("rate a blue star, soft light", "ok")
  assert server.calls["rate a blue star"] == 2
  # 500 on all three tries: falls back to the query, counted and listed.
  assert by_query["down a green square"][:2] == ("down a green square", "fallback")
  assert "HTTP 500" in by_query["down a green square"][2]
  assert server.calls["down a green square"] == 3
  # A hang: each try times out, then it falls back.
  assert by_query["hang a dotted circle"][:2] == ("hang a dotted circle", "fallback")
  assert "timed out" in by_query["hang a dotted circle"][2]
  assert server.calls["hang a dotted circle"] == 3
  # Malformed JSON and a refusal fall back without retries.
  assert by_query["garbled a striped star"][:2] == ("garbled a striped star", "fallback")
  assert "malformed" in by_query["garbled a striped star"][2]
  assert server.calls["garbled a striped star"] == 1
  assert by_query["empty a big cat"][:2] == ("empty a big cat", "fallback")

  summary = result.summary()
  assert (summary["ok"], summary["fallbacks"]) == (3, 4)
  assert [f["query"] for f in summary["fallback_list"]] == queries[2:6]
  assert server.auth == {f"Bearer {KEY}"}
  # The three hanging tries overlap the other requests; all within a few timeouts.
  assert elapsed < 3 * TIMEOUT_S + 1.5
  assert "fell back" in caplog.text


def test_openai_rerun_is_served_by_the_cache_and_fallbacks_are_retried(server, tmp_path):
  path = str(tmp_path / "c.jsonl")
  queries = ["ok a red cat", "down a green square"]
  rephrase.make_rephraser(_config(server), cache_path=path).rephrase_batch(queries)
  assert server.calls == {"ok a red cat": 1, "down a green square": 3}
  again = rephrase.make_rephraser(_config(server), cache_path=path).rephrase_batch(queries)
  assert again.from_cache == [True, False] and again.texts[0] == "ok a red cat, soft light"
  assert server.calls == {"ok a red cat": 1, "down a green square": 6}
  # Another model name is another cache key.
  other = rephrase.make_rephraser(_config(server, model="big-chat"), cache_path=path)
  assert other.rephrase_batch(queries[:1]).backend_calls == 1
  assert server.calls["ok a red cat"] == 2


def test_openai_key_never_appears_in_logs_output_results_or_cache(server, tmp_path, caplog,
                                                                  capsys):
  caplog.set_level(logging.DEBUG)
  path = tmp_path / "c.jsonl"
  rephraser = rephrase.make_rephraser(_config(server), cache_path=str(path))
  result = rephraser.rephrase_batch(["echo a red cat", "ok a red cat", "down a cat",
                                     "moved a cat"])
  assert result.status == ["fallback", "ok", "fallback", "fallback"]
  assert "HTTP 302" in result.reasons[3] and server.calls["moved a cat"] == 1  # not followed
  assert "HTTP 401" in result.reasons[0] and "***" in result.reasons[0]
  assert server.auth == {f"Bearer {KEY}"}  # it was sent...
  captured = capsys.readouterr()
  for text in (caplog.text, captured.out, captured.err, json.dumps(result.summary()),
               path.read_text(), repr(rephraser.backend)):
    assert KEY not in text  # ...and nowhere else
  assert "ok a red cat" in path.read_text()


def test_openai_retry_after_is_honoured_and_capped(server):
  server.retry_after = "0.3"
  start = time.perf_counter()
  result = rephrase.make_rephraser(_config(server, max_backoff_s=5)).rephrase_batch(
      ["rate a cat"])
  assert result.status == ["ok"] and time.perf_counter() - start >= 0.3
  server.retry_after = "100"  # capped at max_backoff_s
  start = time.perf_counter()
  result = rephrase.make_rephraser(_config(server, max_backoff_s=0.1)).rephrase_batch(
      ["rate a dog"])
  assert result.status == ["ok"] and time.perf_counter() - start < 1.0


def test_openai_keeps_at_most_max_concurrency_requests_in_flight(server):
  queries = [f"slow cat number {i}" for i in range(12)]
  result = rephrase.make_rephraser(_config(server, max_concurrency=3)).rephrase_batch(queries)
  assert result.num_ok == 12
  assert server.max_in_flight == 3


def test_openai_config_errors_name_the_key(server, monkeypatch):
  monkeypatch.delenv(KEY_ENV)
  with pytest.raises(ValueError, match=f"rephrase.api_key_env.*{KEY_ENV}"):
    rephrase.make_rephraser(_config(server))
  # An endpoint without a key: no Authorization header at all.
  result = rephrase.make_rephraser(_config(server, api_key_env="")).rephrase_batch(["ok a cat"])
  assert result.status == ["ok"] and server.auth == {None}
  with pytest.raises(ValueError, match="rephrase.timeout_s"):
    rephrase.make_rephraser(_config(server, api_key_env="", timeout_s=0))
  with pytest.raises(ValueError, match="rephrase.max_concurrency"):
    rephrase.make_rephraser(_config(server, api_key_env="", max_concurrency=0))


def test_openai_unreachable_endpoint_falls_back(server):
  config = _config(server, base_url="http://127.0.0.1:9/v1", max_retries=1)
  result = rephrase.make_rephraser(config).rephrase_batch(["ok a cat"])
  assert result.texts == ["ok a cat"] and "connection failed" in result.reasons[0]


def test_openai_endpoint_down_is_counted_in_the_rephrasers_tally(server, tmp_path):
  rephraser = rephrase.make_rephraser(_config(server, max_retries=0),
                                      cache_path=str(tmp_path / "c.jsonl"))
  queries = [f"down query {i}" for i in range(5)]
  rephraser.rephrase_batch(queries)
  rephraser.rephrase_batch(queries[:2] + ["ok a cat"])
  tally = rephraser.tally.to_json()
  assert (tally["queries"], tally["fallbacks"], tally["ok"]) == (8, 7, 1)
  assert tally["backend_calls"] == sum(server.calls.values()) == 8   # fallbacks are retried
  assert tally["rate"] == 7 / 8 and tally["from_cache"] == 0
  assert tally["first_fallback"]["query"] == "down query 0"
  assert "HTTP 500" in tally["first_fallback"]["reason"] and KEY not in json.dumps(tally)
