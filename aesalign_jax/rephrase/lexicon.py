"""The `lexicon` rephraser: offline, deterministic aesthetic rephrasing from a keyword dictionary.

No LLM: each prompt style is a rule that adds keywords from an aspect -> keywords dictionary
(lighting, colour, composition, style, detail, mood). It is the default backend and the one the
embedded world uses, so its core vocabulary is the world's own positive aesthetic words
(input_pipeline/world_text.py: AESTHETIC_WORDS, OVERALL_WORDS): captions in that world carry
them when the image really is good, so a pretrained model links them to good looks and a
query that states them retrieves better-looking images (the paper's first finding).

Keyword choice is seeded by SHA-256 of (seed, style, query), never Python's hash() or
random's generators, so a query gets the same rephrasing in every process, run and Python
version.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence

from aesalign_jax.rephrase.core import Attempt

ASPECTS = ("lighting", "colour", "composition", "style", "detail", "mood")

# The world's positive aesthetic words, by aspect: plain photographic terms, so they serve real
# corpora too. Clutter's words ("clean", "minimal") are a style; the world's overall words
# ("beautiful", "stunning", "high quality") are mood and style.
CORE_KEYWORDS = {
    "lighting": ("well lit", "well exposed"),
    "colour": ("harmonious colours", "matching colours"),
    "composition": ("well composed", "well framed"),
    "style": ("clean", "minimal", "high quality"),
    "detail": ("sharp", "crisp", "in focus", "noise-free", "smooth"),
    "mood": ("beautiful", "stunning"),
}

# A wider photographic vocabulary for real corpora (vocabulary 'extended' = core + these).
# None of these phrases contains a negative word of the world ("dark", "flat", "messy"...).
EXTRA_KEYWORDS = {
    "lighting": ("soft natural light", "golden hour light", "studio lighting",
                 "dramatic lighting", "balanced exposure"),
    "colour": ("vibrant colours", "pastel palette", "warm tones", "complementary colours",
               "rich colour contrast"),
    "composition": ("rule of thirds", "centred subject", "balanced composition",
                    "shallow depth of field", "uncluttered background"),
    "style": ("professional photography", "fine art photograph", "award-winning photo",
              "editorial style"),
    "detail": ("highly detailed", "fine textures", "high resolution", "tack sharp"),
    "mood": ("serene", "elegant", "atmospheric", "calm", "inviting"),
}

VOCABULARIES = ("core", "extended")


def keyword_dictionary(vocabulary: str = "core") -> dict[str, tuple[str, ...]]:
  """aspect -> keywords for 'core', 'extended', or a JSON file {aspect: [keywords...]}.

  A JSON file must name every aspect of ASPECTS with at least one keyword.
  """
  if vocabulary == "core":
    return dict(CORE_KEYWORDS)
  if vocabulary == "extended":
    return {a: CORE_KEYWORDS[a] + EXTRA_KEYWORDS[a] for a in ASPECTS}
  if vocabulary.endswith(".json"):
    return _load_dictionary(vocabulary)
  raise ValueError(f"rephrase.vocabulary must be one of {', '.join(VOCABULARIES)} or a .json "
                   f"file; got {vocabulary!r}")


def _load_dictionary(path: str) -> dict[str, tuple[str, ...]]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"rephrase.vocabulary: no keyword file {path}")
  with open(path, encoding="utf-8") as f:
    try:
      raw = json.load(f)
    except ValueError as e:
      raise ValueError(f"rephrase.vocabulary: {path} is not valid JSON: {e}") from None
  if not isinstance(raw, Mapping):
    raise ValueError(f"rephrase.vocabulary: {path} must hold an object {{aspect: [keywords]}}")
  missing = [a for a in ASPECTS if not raw.get(a)]
  if missing:
    raise ValueError(f"rephrase.vocabulary: {path} has no keywords for {', '.join(missing)}")
  out = {}
  for aspect in ASPECTS:
    words = raw[aspect]
    if not (isinstance(words, list) and all(isinstance(w, str) and w.strip() for w in words)):
      raise ValueError(f"rephrase.vocabulary: {path}: {aspect!r} must be a list of non-empty "
                       "strings")
    out[aspect] = tuple(" ".join(w.split()) for w in words)
  return out


def _shuffled(items, *salt) -> list:
  """`items` in an order fixed by SHA-256 of (salt, item): the same in every process and
  Python version (random.Random's algorithms may change between versions; hash() is salted)."""
  prefix = "\x1f".join(str(s) for s in salt)
  return sorted(items, key=lambda item: hashlib.sha256(f"{prefix}\x1f{item}".encode()).digest())


def _contains(text: str, phrase: str) -> bool:
  return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(phrase), text, re.I) is not None


class _Picker:
  """Draws keywords per aspect in a seeded order, skipping those the query already says."""

  def __init__(self, dictionary, query, style, seed):
    salt = (int(seed), style, query)
    self._left = {a: [w for w in _shuffled(ws, *salt, a) if not _contains(query, w)]
                  for a, ws in dictionary.items()}
    self.aspect_order = _shuffled(ASPECTS, *salt, "aspects")

  def one(self, aspect: str) -> str | None:
    left = self._left[aspect]
    return left.pop(0) if left else None

  def round_robin(self, k: int) -> list[str]:
    """k keywords, one per aspect (in a seeded aspect order) before any aspect repeats."""
    out = []
    while len(out) < k and any(self._left.values()):
      for aspect in self.aspect_order:
        word = self.one(aspect)
        if word is not None and len(out) < k:
          out.append(word)
    return out


def _join(*parts) -> str:
  return ", ".join(p for p in parts if p)


def rephrase_query(query: str, style: str, *, k: int = 3, seed: int = 0,
                   dictionary: Mapping[str, Sequence[str]] | None = None) -> str:
  """The lexicon rephrasing of `query` in `style` (deterministic in query, style, k, seed).

  Rules ('a red cat' as the query):
    original: the query unchanged.
    detail:   the query, then one keyword per aspect in ASPECTS order
              ("a red cat, well lit, harmonious colours, well composed, clean, sharp, beautiful").
    k_list:   the query, then k keywords, one per aspect (seeded aspect order) before any
              aspect repeats ("a red cat, crisp, well framed, stunning").
    kw_dict:  the query, then k 'aspect: keyword' pairs, flattened, for k distinct aspects
              in a seeded order ("a red cat, mood: stunning, lighting: well lit, colour:
              matching colours"); k, not all six, keeps it within a 32-token text tower.
    repeat:   the query restated for emphasis, then a mood and a detail keyword
              ("a red cat, a red cat, beautiful, sharp").
    reorg:    subject, style, composition, lighting, colour, mood
              ("a red cat, minimal, well framed, well exposed, matching colours, stunning").
  Keywords the query already contains are not added again.
  """
  query = " ".join(str(query).split()).rstrip(" .,;:")
  if style == "original" or not query:
    return query
  words = _Picker(dictionary or CORE_KEYWORDS, query, style, seed)
  if style == "detail":
    return _join(query, *(words.one(a) for a in ASPECTS))
  if style == "k_list":
    return _join(query, *words.round_robin(int(k)))
  if style == "kw_dict":
    pairs = [(a, words.one(a)) for a in words.aspect_order]
    return _join(query, *[f"{a}: {w}" for a, w in pairs if w][:int(k)])
  if style == "repeat":
    return _join(query, query, words.one("mood"), words.one("detail"))
  if style == "reorg":
    return _join(query, *(words.one(a) for a in
                          ("style", "composition", "lighting", "colour", "mood")))
  raise ValueError(f"rephrase.style must be one of original, detail, k_list, kw_dict, repeat, "
                   f"reorg; got {style!r}")


class LexiconBackend:
  """Backend `lexicon`: never fails, needs no cache (it is instant and deterministic)."""

  name = "lexicon"
  cacheable = False

  def __init__(self, vocabulary: str = "core", k: int = 3, seed: int = 0):
    self.dictionary = keyword_dictionary(vocabulary)
    self.model = vocabulary
    self.k = int(k)
    self.seed = int(seed)

  def complete(self, queries: Sequence[str], style: str) -> list[Attempt]:
    """One rephrasing per query (see `rephrase_query`)."""
    return [Attempt(rephrase_query(q, style, k=self.k, seed=self.seed,
                                   dictionary=self.dictionary)) for q in queries]
