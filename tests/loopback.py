"""A loopback HTTP server for the tests of OpenAI-compatible clients (rephraser, judge)."""

import contextlib
import threading

PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                   "ALL_PROXY")


def send_json(handler, status, payload: bytes, headers=()):
  """Writes one JSON response from a BaseHTTPRequestHandler."""
  handler.send_response(status)
  handler.send_header("Content-Type", "application/json")
  handler.send_header("Content-Length", str(len(payload)))
  for name, value in dict(headers).items():
    handler.send_header(name, value)
  handler.end_headers()
  handler.wfile.write(payload)


@contextlib.contextmanager
def serving(server, monkeypatch, key_env: str, key: str):
  """Runs `server` in a thread with no proxy in the way and the API key in the environment."""
  for name in PROXY_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv(key_env, key)
  thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  try:
    yield server
  finally:
    release = getattr(server, "release", None)
    if release is not None:
      release.set()
    server.shutdown()
    server.server_close()


def chat_answer(content: str, finish_reason: str = "stop") -> bytes:
  """The body of an OpenAI /v1/chat/completions answer carrying `content`."""
  import json
  return json.dumps({"id": "x", "object": "chat.completion", "choices": [
      {"index": 0, "finish_reason": finish_reason,
       "message": {"role": "assistant", "content": content}}]}).encode()
