"""Query rephrasing: restate a search query with aesthetic expectations (PAPER.md step 1).

- prompts: the prompt styles (original, detail, k_list, kw_dict, repeat, reorg) and the parser
  that extracts one clean query line from an LLM's answer;
- lexicon: the offline, deterministic backend (an aesthetic keyword dictionary; the default);
- hf_backend: a local transformers causal LM; openai_backend: an OpenAI-compatible endpoint;
- cache: JSON Lines on disk, so reruns are free and resumable;
- core: the Rephraser (fallback policy), its RephraseResult, and the RephraseTally of
  fallbacks over many calls (what a stage's summary and the report quote).

Usage:
  rephraser = make_rephraser(config.rephrase)
  result = rephraser.rephrase_batch(queries)   # result.texts, result.summary()
  rephraser.tally.to_json()                    # {queries, fallbacks, rate, ...} so far
"""

from __future__ import annotations

import ml_collections

from aesalign_jax.rephrase import prompts
from aesalign_jax.rephrase.cache import RephraseCache
from aesalign_jax.rephrase.core import (Attempt, Backend, Rephraser, RephraseResult,
                                        RephraseTally, concat_results)
from aesalign_jax.rephrase.lexicon import LexiconBackend, rephrase_query
from aesalign_jax.rephrase.prompts import STYLES, parse_answer

BACKENDS = ("lexicon", "hf", "openai")

__all__ = ["Attempt", "BACKENDS", "Backend", "LexiconBackend", "RephraseCache",
           "RephraseResult", "RephraseTally", "Rephraser", "STYLES", "concat_results",
           "default_config",
           "make_backend", "make_rephraser", "parse_answer", "rephrase_query"]


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the `rephrase` config section."""
  c = ml_collections.ConfigDict()
  # Which backend: lexicon (offline keyword dictionary) | hf (local transformers causal LM
  # folder) | openai (an OpenAI-compatible /v1/chat/completions endpoint).
  c.backend = "lexicon"
  # Prompt style: original (query unchanged) | detail | k_list | kw_dict | repeat | reorg.
  c.style = "detail"
  # Keywords the k_list style adds (lexicon) or asks for (hf, openai).
  c.num_keywords = 3
  # lexicon: keyword dictionary, 'core' (the embedded world's positive aesthetic words),
  # 'extended' (core + a wider photographic vocabulary) or a .json file {aspect: [words]}.
  c.vocabulary = "core"
  # lexicon: seed of the keyword choice (hashed with the query and style).
  c.seed = 0
  # hf: the model folder (config.json, weights, tokenizer). openai: the endpoint's model name.
  c.model = ""
  # openai: API root including the version, e.g. https://api.openai.com/v1.
  c.base_url = "http://localhost:8000/v1"
  # openai: NAME of the environment variable that holds the API key ('' = send no key).
  c.api_key_env = "OPENAI_API_KEY"
  # openai: seconds per socket operation of one request.
  c.timeout_s = 30.0
  # openai: extra tries after a 429, 5xx, timeout or connection error.
  c.max_retries = 3
  # openai: first backoff in seconds (doubles per retry, with jitter); Retry-After wins.
  c.backoff_s = 1.0
  # openai: cap on any single wait, Retry-After included.
  c.max_backoff_s = 30.0
  # openai: requests in flight at once.
  c.max_concurrency = 8
  # openai: sampling temperature (0 = as deterministic as the endpoint allows).
  c.temperature = 0.0
  # hf, openai: the most tokens one answer may have (one query line needs few).
  c.max_new_tokens = 64
  # hf: torch device (cpu, cuda, cuda:1, mps), weight dtype (auto | float32 | bfloat16 |
  # float16), and queries per generate call.
  c.device = "cpu"
  c.dtype = "auto"
  c.batch_size = 16
  # JSON Lines cache of successful rephrasings ('' = none; relative paths are resolved by the
  # caller, e.g. under the workdir). Not used by lexicon, which is instant.
  c.cache_path = ""
  return c


def make_backend(config: ml_collections.ConfigDict) -> Backend:
  """The backend named by `config.backend` (the `rephrase` section)."""
  k = int(config.num_keywords)
  if k < 1:
    raise ValueError(f"rephrase.num_keywords must be >= 1; got {config.num_keywords}")
  if config.backend == "lexicon":
    return LexiconBackend(config.vocabulary, k=k, seed=config.seed)
  if config.backend == "hf":
    if not config.model:
      raise ValueError("rephrase.model is empty; the hf backend needs a local model folder")
    from aesalign_jax.rephrase.hf_backend import HFBackend  # imports torch
    return HFBackend(config.model, device=config.device, max_new_tokens=config.max_new_tokens,
                     batch_size=config.batch_size, k=k, dtype=config.dtype)
  if config.backend == "openai":
    from aesalign_jax.rephrase.openai_backend import OpenAIBackend
    return OpenAIBackend(config.base_url, config.model, api_key_env=config.api_key_env,
                         timeout_s=config.timeout_s, max_retries=config.max_retries,
                         backoff_s=config.backoff_s, max_backoff_s=config.max_backoff_s,
                         max_concurrency=config.max_concurrency,
                         max_new_tokens=config.max_new_tokens,
                         temperature=config.temperature, k=k)
  raise ValueError(f"rephrase.backend must be one of {', '.join(BACKENDS)}; "
                   f"got {config.backend!r}")


def make_rephraser(config: ml_collections.ConfigDict, cache_path: str | None = None, *,
                   across_processes: bool = False) -> Rephraser:
  """A Rephraser from the `rephrase` config section.

  cache_path overrides config.cache_path (e.g. a path resolved under the workdir); the
  style is checked before any model is loaded. across_processes: every process of a
  multi-process run calls it and makes the same calls (Rephraser); process 0 writes the
  cache, the others read it (all after every process has loaded it: the same entries).
  """
  prompts.check_style(config.style)
  if config.backend not in BACKENDS:
    raise ValueError(f"rephrase.backend must be one of {', '.join(BACKENDS)}; "
                     f"got {config.backend!r}")
  backend = make_backend(config)
  path = config.cache_path if cache_path is None else cache_path
  shared = False
  if across_processes:
    from aesalign_jax import multihost  # pylint: disable=g-import-not-at-top  (jax)
    shared = multihost.count() > 1
  read_only = shared and not multihost.is_writer()
  cache = RephraseCache(path, read_only=read_only) if path and backend.cacheable else None
  if shared:
    multihost.barrier(f'rephrase cache {path} loaded')
  return Rephraser(backend, config.style, cache=cache, k=int(config.num_keywords),
                   across_processes=shared)
