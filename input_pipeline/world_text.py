"""Words of the embedded world: captions, aesthetic vocabulary, and the query sets.

Captions always name every object as "<size> <colour> <shape>" (size word from SIZE_WORDS,
colour and shape as in COLOURS and SHAPES) and the background pattern as "<pattern>
background" or "<pattern> backdrop" (PATTERNS), in one of several templates. A caption never
names an object that is not drawn, so relevance (Query.matches) can be read off the caption.

A configurable fraction of captions also carries 1 to 3 aesthetic phrases (AESTHETIC_WORDS)
that follow the true factors: a factor is only described when it is clearly good
(>= POSITIVE_AT) or clearly bad (<= NEGATIVE_AT), and the overall words ("beautiful",
"amateur"...) only when the ground truth is >= OVERALL_POSITIVE_AT or <= OVERALL_NEGATIVE_AT.
A caption drawn to carry aesthetic words whose factors are all middling carries none (about
0.4% of them). Exposure's negative words name the failure the pixels show (dark, washed out,
flat).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from input_pipeline import world_scene as ws

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}

# factor -> (positive phrases, negative phrases); exposure's negatives per EXPOSURE_MODES.
# No phrase is part of another or of a semantic word, so captions parse unambiguously.
AESTHETIC_WORDS = {
    "sharpness": (("sharp", "crisp", "in focus"), ("blurry", "out of focus")),
    "noise": (("noise-free", "smooth"), ("grainy", "noisy")),
    "exposure": (("well exposed", "well lit"),
                 {"dark": ("dark", "underexposed"), "bright": ("overexposed", "washed out"),
                  "flat": ("flat", "low contrast")}),
    "harmony": (("harmonious colours", "matching colours"),
                ("clashing colours", "garish colours")),
    "composition": (("well composed", "well framed"), ("badly framed", "poorly composed")),
    "clutter": (("clean", "minimal"), ("cluttered", "messy")),
}
OVERALL_WORDS = (("beautiful", "stunning", "high quality"), ("ugly", "amateur", "low quality"))
POSITIVE_AT, NEGATIVE_AT = 0.7, 0.3
OVERALL_POSITIVE_AT, OVERALL_NEGATIVE_AT = 0.6, 0.4

_ONE_OBJECT = ("{o} on a {b}", "a photo of {o} on a {b}", "{o} in front of a {b}",
               "an image of {o} against a {b}", "a {b} with {o}", "there is {o} on a {b}")
_TWO_OBJECTS = ("{o} and {p} on a {b}", "a photo of {o} next to {p} on a {b}",
                "{o} beside {p}, {b}", "a {b} with {o} and {p}")
_BACKDROPS = ("background", "backdrop")


def aesthetic_phrase_table() -> list[tuple[str, str, str]]:
  """Every aesthetic phrase as (phrase, factor or 'overall', 'positive'/'negative'[:mode])."""
  rows = []
  for factor, (pos, neg) in AESTHETIC_WORDS.items():
    rows += [(w, factor, "positive") for w in pos]
    if isinstance(neg, dict):
      rows += [(w, factor, f"negative:{mode}") for mode, ws_ in neg.items() for w in ws_]
    else:
      rows += [(w, factor, "negative") for w in neg]
  rows += [(w, "overall", "positive") for w in OVERALL_WORDS[0]]
  rows += [(w, "overall", "negative") for w in OVERALL_WORDS[1]]
  return rows


_PHRASE_ROWS = {row[0]: row for row in aesthetic_phrase_table()}
_PHRASE_RE = re.compile(r"(?<![\w-])(%s)(?![\w-])" % "|".join(
    re.escape(p) for p in sorted(_PHRASE_ROWS, key=len, reverse=True)))


def find_aesthetic_phrases(caption: str) -> list[tuple[str, str, str]]:
  """The aesthetic phrases a caption contains, as rows of aesthetic_phrase_table()."""
  return [_PHRASE_ROWS[m] for m in _PHRASE_RE.findall(caption)]


def _pick(options, u):
  return options[min(int(u * len(options)), len(options) - 1)]


def _object_phrase(scene, row, k, u):
  size = _pick(SIZE_WORDS[ws.SIZES[scene.size[row, k]]], u)
  return f"a {size} {ws.COLOURS[scene.colour[row, k]]} {ws.SHAPES[scene.shape[row, k]]}"


def _aesthetic_terms(factors, aesthetic, mode, u):
  """Up to 3 phrases for the clearly good or bad factors (u: 15 uniforms)."""
  candidates = []
  for j, name in enumerate(ws.FACTOR_NAMES):
    pos, neg = AESTHETIC_WORDS[name]
    if factors[j] >= POSITIVE_AT:
      candidates.append(pos)
    elif factors[j] <= NEGATIVE_AT:
      candidates.append(neg[ws.EXPOSURE_MODES[mode]] if isinstance(neg, dict) else neg)
  if aesthetic >= OVERALL_POSITIVE_AT:
    candidates.append(OVERALL_WORDS[0])
  elif aesthetic <= OVERALL_NEGATIVE_AT:
    candidates.append(OVERALL_WORDS[1])
  count = min(len(candidates), 1 + int(u[0] * 3))
  order = np.argsort(u[1:1 + len(candidates)])[:count]  # a random subset, in random order
  return [_pick(candidates[j], u[8 + j]) for j in order]


def captions(scene: ws.Scene, seed: int, aesthetic_fraction: float) -> list[str]:
  """One caption per scene row (deterministic per record)."""
  u = ws.uniforms(seed, scene.index, ws.STREAM_CAPTION, 23)
  out = []
  for row in range(len(scene)):
    ur = u[row]
    backdrop = f"{ws.PATTERNS[scene.pattern[row]]} {_pick(_BACKDROPS, ur[0])}"
    o = _object_phrase(scene, row, 0, ur[1])
    if scene.num_objects[row] == 2:
      text = _pick(_TWO_OBJECTS, ur[3]).format(o=o, p=_object_phrase(scene, row, 1, ur[2]),
                                               b=backdrop)
    else:
      text = _pick(_ONE_OBJECT, ur[3]).format(o=o, b=backdrop)
    if ur[4] < aesthetic_fraction:
      terms = _aesthetic_terms(scene.factors[row], scene.aesthetic[row],
                               scene.exposure_mode[row], ur[8:23])
      if terms:
        style = int(ur[5] * 3)
        if style == 0:
          text = f"{text}, {', '.join(terms)}"
        elif style == 1:
          text = f"{', '.join(terms)}: {text}"
        else:
          text = f"{text} ({' and '.join(terms)})"
    out.append(text)
  return out


@dataclasses.dataclass(frozen=True)
class Query:
  """A semantic-only query: text plus the attributes it asks for (None = any)."""
  text: str
  colour: str
  shape: str
  size: str | None = None
  pattern: str | None = None

  @property
  def kind(self) -> str:
    """'colour_shape', 'size_colour_shape' or 'colour_shape_pattern'."""
    if self.size:
      return "size_colour_shape"
    return "colour_shape_pattern" if self.pattern else "colour_shape"

  def matches(self, scene: ws.Scene) -> np.ndarray:
    """bool [N]: some object has the colour and shape (and size), on the pattern if asked."""
    hit = ((scene.colour == ws.COLOURS.index(self.colour))
           & (scene.shape == ws.SHAPES.index(self.shape)))
    if self.size is not None:
      hit &= scene.size == ws.SIZES.index(self.size)
    hit = hit.any(1)
    if self.pattern is not None:
      hit &= scene.pattern == ws.PATTERNS.index(self.pattern)
    return hit


def all_queries() -> list[Query]:
  """Every query the world offers, in a fixed order (336 with the default vocabulary)."""
  out = []
  for c in ws.COLOURS:
    for s in ws.SHAPES:
      out.append(Query(f"a {c} {s}", c, s))
      for z in ws.SIZES:
        out.append(Query(f"a {z} {c} {s}", c, s, size=z))
      for p in ws.PATTERNS:
        out.append(Query(f"a {c} {s} on a {p} background", c, s, pattern=p))
  return out


def parse_query(text: str) -> Query | None:
  """The Query a free-text search names, or None: exactly one colour and one shape word
  (plural shapes too), at most one size word (SIZE_WORDS) and one pattern word; other words
  (articles, aesthetic words a rephrasing adds) are ignored. Lets a typed query such as "big
  red circles, sharp" be judged on or off topic like the world's own queries."""
  words = re.findall(r"[a-z]+", text.lower())
  colours = {w for w in words if w in ws.COLOURS}
  shapes = {s for w in words for s in ws.SHAPES if w in (s, s + "s", s + "es")}
  sizes = {size for size, names in SIZE_WORDS.items() for w in words if w in names}
  patterns = {w for w in words if w in ws.PATTERNS}
  if len(colours) != 1 or len(shapes) != 1 or len(sizes) > 1 or len(patterns) > 1:
    return None   # no object named, or more than the one a Query asks for: unknown
  return Query(text, colours.pop(), shapes.pop(), size=sizes.pop() if sizes else None,
               pattern=patterns.pop() if patterns else None)


def split_queries(seed: int, num_queries: int, num_eval: int) -> tuple[list[Query], list[Query]]:
  """(mining, evaluation) queries: disjoint, deterministic in seed, stratified by kind.

  Each kind's queries are shuffled and given evenly spaced ranks in [0, 1); sorting all
  queries by rank interleaves the kinds, the first num_queries are used, and the first
  num_eval of those are held out for evaluation.
  """
  pool = all_queries()
  if not 0 < num_eval < num_queries <= len(pool):
    raise ValueError(f"world queries: need 0 < num_eval_queries ({num_eval}) < num_queries "
                     f"({num_queries}) <= {len(pool)}")
  rng = np.random.default_rng([int(seed) % 2**63, 0x71756572])  # "quer"
  rank = np.empty(len(pool))
  for kind in ("colour_shape", "size_colour_shape", "colour_shape_pattern"):
    members = [j for j, q in enumerate(pool) if q.kind == kind]
    perm = rng.permutation(len(members))
    rank[np.array(members)[perm]] = (np.arange(len(members)) + 0.5) / len(members)
  order = np.argsort(rank, kind="stable")[:num_queries]
  chosen = [pool[j] for j in order]
  return chosen[num_eval:], chosen[:num_eval]
