"""An append-only JSON Lines cache of successful rephrasings, so reruns are free and resumable.

One line per entry:
  {"key": "<sha256>", "backend": "openai", "model": "...", "style": "detail",
   "prompt": "<prompt fingerprint>", "query": "...", "text": "..."}
The key is a SHA-256 of the other identifying fields, so a query is found again only under the
same backend, model, style and prompt. Each entry is written and flushed on its own, so a
killed run keeps every finished entry; a line cut short by the kill is dropped (with a warning)
on the next load. Only successes are written: fallbacks are retried on the next run. Nothing
secret is stored (no API key, no URL).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading

logger = logging.getLogger(__name__)


def cache_key(backend: str, model: str, style: str, prompt: str, query: str) -> str:
  """A stable hex key for (backend, model, style, prompt fingerprint, query)."""
  fields = json.dumps([backend, model, style, prompt, query], ensure_ascii=False)
  return hashlib.sha256(fields.encode("utf-8")).hexdigest()


class RephraseCache:
  """Loads the entries already in `path` and appends new ones (thread-safe)."""

  def __init__(self, path: str | os.PathLike, *, read_only: bool = False):
    """read_only: read the entries, keep new ones in memory only (another process writes the
    file)."""
    self.path = os.fspath(path)
    self._entries: dict[str, str] = {}
    self._lock = threading.Lock()
    self.skipped_lines = 0
    self._read_only = read_only
    self._load()
    self._file = None
    if not read_only:
      parent = os.path.dirname(os.path.abspath(self.path))
      os.makedirs(parent, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")

  def __len__(self) -> int:
    return len(self._entries)

  def get(self, backend: str, model: str, style: str, prompt: str, query: str) -> str | None:
    """The cached rephrasing, or None."""
    return self._entries.get(cache_key(backend, model, style, prompt, query))

  def put(self, backend: str, model: str, style: str, prompt: str, query: str,
          text: str) -> None:
    """Appends one entry and flushes it to the file."""
    key = cache_key(backend, model, style, prompt, query)
    line = json.dumps(dict(key=key, backend=backend, model=model, style=style, prompt=prompt,
                           query=query, text=text), ensure_ascii=False)
    with self._lock:
      if self._entries.get(key) == text:
        return
      if self._file is not None:
        self._file.write(line + "\n")
        self._file.flush()
      self._entries[key] = text

  def close(self) -> None:
    with self._lock:
      if self._file is not None:
        self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _load(self) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb") as f:
      data = f.read()
    complete = data.rfind(b"\n") + 1
    if complete < len(data) and not self._read_only:
      # A run killed mid-write: drop the partial line so that new entries start on a fresh one.
      logger.warning("rephrase cache %s: ignoring an unfinished last line (%d bytes); "
                     "it is removed", self.path, len(data) - complete)
      self.skipped_lines += 1
      with open(self.path, "r+b") as f:
        f.truncate(complete)
    for number, raw in enumerate(data[:complete].splitlines(), 1):
      if not raw.strip():
        continue
      try:
        entry = json.loads(raw.decode("utf-8"))
        key, text = entry["key"], entry["text"]
        if not (isinstance(key, str) and isinstance(text, str) and text):
          raise ValueError("key and text must be non-empty strings")
        if key != cache_key(entry["backend"], entry["model"], entry["style"], entry["prompt"],
                            entry["query"]):
          raise ValueError("key does not match its fields")
      except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        logger.warning("rephrase cache %s line %d: skipped (%s)", self.path, number, e)
        self.skipped_lines += 1
        continue
      self._entries[key] = text
