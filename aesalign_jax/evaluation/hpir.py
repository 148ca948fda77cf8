"""HPIR-format preference benchmark: file format, loader, writer and scorer.

Format (JSON Lines, UTF-8, one item per line; blank lines are ignored)
----------------------------------------------------------------------
Each line is one JSON object::

    {"id": "q017-3",                                   # optional string; default "line-<n>"
     "query": "a red circle on a striped background",   # required, non-empty string
     "group_a": ["images/q017-3/a0.png", "..."],        # required, non-empty list of image refs
     "group_b": ["images/q017-3/b0.png", "..."],        # required, non-empty list of image refs
     "labels": {                                        # required, at least one aspect
       "accuracy":  {"preferred": "A", "confidence": 0.8},
       "aesthetic": {"preferred": "B", "confidence": 0.6}},
     "meta": {"any": "JSON"}}                           # optional object, carried through as is

- Image references are paths relative to the folder that holds the JSONL file, or absolute
  paths. They are resolved with `HPIRFile.resolve` / `HPIRItem.paths`; the loader does not
  open images.
- Aspects are "accuracy" (does the group match the query) and "aesthetic" (is it more
  beautiful). An item may label only some of them; it then counts only for those.
- "preferred" is "A" or "B": the group the humans preferred. "confidence" is a number in
  [0, 1], e.g. annotator agreement; 0 means "no preference" and the item does not count for
  that aspect.
- Other top-level keys are ignored, so producers may add fields; put extras in "meta".

Malformed lines (bad JSON, a missing or mistyped field, a group label other than "A"/"B",
a confidence outside [0, 1], an unknown aspect) are, by default, skipped: each is named with
its line number in one warning and listed in `HPIRFile.bad_lines`. With `strict=True` the first
malformed line raises `HPIRFormatError` naming the file and the line number.

Scoring (PAPER.md, "HPIR-style evaluation")
-------------------------------------------
A model scores a group by the mean similarity of the query to the group's images and picks the
group with the higher mean. Per aspect::

    score = sum(confidence * [model choice == human choice]) / sum(confidence)

An exact tie between the two means earns half credit (the expected value of a coin flip), so a
model that cannot tell the groups apart scores 0.5, not 0 or 1. Items of confidence 0 add
nothing to either sum. The scorer takes precomputed similarities or a callable, so it does not
depend on any model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

ASPECTS = ("accuracy", "aesthetic")
GROUPS = ("A", "B")

logger = logging.getLogger(__name__)


class HPIRFormatError(ValueError):
  """A malformed HPIR line (raised in strict mode, and per line internally)."""


@dataclasses.dataclass(frozen=True)
class AspectLabel:
  """The human verdict on one aspect: the preferred group and how sure the humans were."""
  preferred: str  # "A" or "B"
  confidence: float  # in [0, 1]; 0 = no preference, the item does not count

  def __post_init__(self):
    if self.preferred not in GROUPS:
      raise HPIRFormatError(f'preferred must be "A" or "B", got {self.preferred!r}')
    conf = self.confidence
    if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not math.isfinite(conf):
      raise HPIRFormatError(f"confidence must be a finite number, got {conf!r}")
    if not 0.0 <= conf <= 1.0:
      raise HPIRFormatError(f"confidence must be in [0, 1], got {conf!r}")


@dataclasses.dataclass(frozen=True)
class HPIRItem:
  """One comparison: a query, two groups of image references and per-aspect human labels."""
  query: str
  group_a: tuple[str, ...]
  group_b: tuple[str, ...]
  labels: Mapping[str, AspectLabel]  # aspect name (one of ASPECTS) -> label
  id: str = ""
  meta: Mapping[str, object] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # Normalise lists to tuples so items are hashable-ish and immutable in spirit.
    object.__setattr__(self, "group_a", tuple(self.group_a))
    object.__setattr__(self, "group_b", tuple(self.group_b))
    if not isinstance(self.query, str) or not self.query.strip():
      raise HPIRFormatError("query must be a non-empty string")
    for name in ("group_a", "group_b"):
      refs = getattr(self, name)
      if not refs:
        raise HPIRFormatError(f"{name} must be a non-empty list of image paths")
      if not all(isinstance(r, str) and r for r in refs):
        raise HPIRFormatError(f"{name} must hold non-empty strings (image paths)")
    if not self.labels:
      raise HPIRFormatError(f"labels must name at least one aspect of {ASPECTS}")
    for aspect, label in self.labels.items():
      if aspect not in ASPECTS:
        raise HPIRFormatError(f"unknown aspect {aspect!r} in labels; known: {ASPECTS}")
      if not isinstance(label, AspectLabel):
        raise HPIRFormatError(f"labels[{aspect!r}] must be an AspectLabel")

  def paths(self, root: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Resolves both groups' references against `root` (the JSONL file's folder)."""
    return ([_resolve(root, r) for r in self.group_a],
            [_resolve(root, r) for r in self.group_b])

  def to_json(self) -> dict:
    """The item as the JSON object of one line."""
    out: dict = {}
    if self.id:
      out["id"] = self.id
    out["query"] = self.query
    out["group_a"] = list(self.group_a)
    out["group_b"] = list(self.group_b)
    out["labels"] = {a: {"preferred": l.preferred, "confidence": float(l.confidence)}
                     for a, l in self.labels.items()}
    if self.meta:
      out["meta"] = dict(self.meta)
    return out

  @classmethod
  def from_json(cls, obj: object) -> "HPIRItem":
    """Parses and validates one line's decoded JSON; raises HPIRFormatError on any problem."""
    if not isinstance(obj, dict):
      raise HPIRFormatError(f"a line must be a JSON object, got {type(obj).__name__}")
    for key in ("query", "group_a", "group_b", "labels"):
      if key not in obj:
        raise HPIRFormatError(f"missing field {key!r}")
    for key in ("group_a", "group_b"):
      if not isinstance(obj[key], list):
        raise HPIRFormatError(f"{key} must be a list of image paths")
    item_id = obj.get("id", "")
    if not isinstance(item_id, str):
      raise HPIRFormatError("id must be a string")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
      raise HPIRFormatError("meta must be a JSON object")
    raw_labels = obj["labels"]
    if not isinstance(raw_labels, dict):
      raise HPIRFormatError("labels must be a JSON object of aspect -> label")
    labels = {}
    for aspect, raw in raw_labels.items():
      if not isinstance(raw, dict):
        raise HPIRFormatError(f"labels[{aspect!r}] must be an object")
      for key in ("preferred", "confidence"):
        if key not in raw:
          raise HPIRFormatError(f"missing field labels[{aspect!r}][{key!r}]")
      try:
        labels[aspect] = AspectLabel(raw["preferred"], raw["confidence"])
      except HPIRFormatError as e:
        raise HPIRFormatError(f"labels[{aspect!r}]: {e}") from None
    return cls(query=obj["query"], group_a=obj["group_a"], group_b=obj["group_b"],
               labels=labels, id=item_id, meta=meta)


@dataclasses.dataclass(frozen=True)
class BadLine:
  """A line the loader skipped: 1-based line number and why."""
  line_number: int
  reason: str


@dataclasses.dataclass
class HPIRFile:
  """The loaded content of one HPIR JSONL file."""
  path: Path
  items: list[HPIRItem]
  bad_lines: list[BadLine]

  @property
  def root(self) -> Path:
    """The folder relative image references are resolved against."""
    return self.path.parent

  def resolve(self, ref: str) -> Path:
    """One image reference as a path (absolute refs unchanged)."""
    return _resolve(self.root, ref)


def _resolve(root: str | os.PathLike, ref: str) -> Path:
  p = Path(ref)
  return p if p.is_absolute() else Path(root) / p


def load_hpir(path: str | os.PathLike, *, strict: bool = False) -> HPIRFile:
  """Reads an HPIR JSONL file, validating every line.

  Args:
    path: the .jsonl file.
    strict: if True, the first malformed line raises HPIRFormatError (naming file and line);
      if False (default), malformed lines are skipped, listed in `bad_lines` and named in one
      warning.
  Returns:
    HPIRFile with the valid items in file order and the skipped lines.
  """
  path = Path(path)
  items: list[HPIRItem] = []
  bad: list[BadLine] = []
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8").strip()
        if not text:
          continue
        item = HPIRItem.from_json(json.loads(text))
        if not item.id:
          item = dataclasses.replace(item, id=f"line-{line_number}")
        items.append(item)
      except (UnicodeDecodeError, json.JSONDecodeError, HPIRFormatError) as e:
        kind = "not UTF-8" if isinstance(e, UnicodeDecodeError) else (
            "bad JSON" if isinstance(e, json.JSONDecodeError) else "invalid item")
        reason = f"{kind}: {e}"
        if strict:
          raise HPIRFormatError(f"{path}: line {line_number}: {reason}") from e
        bad.append(BadLine(line_number, reason))
  if bad:
    shown = "; ".join(f"line {b.line_number}: {b.reason}" for b in bad[:20])
    more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
    logger.warning("%s: skipped %d malformed HPIR line(s), kept %d: %s%s",
                   path, len(bad), len(items), shown, more)
  return HPIRFile(path=path, items=items, bad_lines=bad)


def write_hpir(path: str | os.PathLike, items: Iterable[HPIRItem]) -> int:
  """Writes items as HPIR JSON Lines (atomically: temp file then rename); returns the count.

  Image references are written as given: make them relative to `path`'s folder (or absolute)
  so the file loads from anywhere.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  n = 0
  with open(tmp, "w", encoding="utf-8") as f:
    for item in items:
      f.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
      n += 1
  os.replace(tmp, path)
  return n


def default_config():
  """An HPIR section of config.evals (type 'hpir'; evaluation/report.py's HPIREvaluator
  scores each system on the file, metrics '<section>/accuracy', '<section>/aesthetic')."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.type = 'hpir'
  # An HPIR-format JSON Lines file (the format above): the paper's HPIR, were it released,
  # or your own labelled comparisons. '' = skip (no HPIR numbers).
  c.path = ''
  return c


# ---------------------------------------------------------------------------------------------
# Scoring.

@dataclasses.dataclass(frozen=True)
class AspectScore:
  """Confidence-weighted agreement with the humans on one aspect."""
  score: float  # sum(conf * agree) / sum(conf); NaN when no item counts
  items_counted: int  # items with this aspect labelled and confidence > 0
  total_confidence: float


# Per item, the query's similarity to each image of group A and of group B.
GroupSimilarities = tuple[Sequence[float], Sequence[float]]
# (query, image paths of one group) -> similarity per image.
SimilarityFn = Callable[[str, Sequence[Path]], Sequence[float]]


def model_choices(similarities: Sequence[GroupSimilarities]) -> list[str | None]:
  """Per item, "A" or "B": the group with the higher mean similarity; None on an exact tie."""
  choices: list[str | None] = []
  for i, (sims_a, sims_b) in enumerate(similarities):
    a, b = np.asarray(sims_a, np.float64), np.asarray(sims_b, np.float64)
    if a.size == 0 or b.size == 0:
      raise ValueError(f"item {i}: empty similarity list for a group")
    mean_a, mean_b = a.mean(), b.mean()
    if not (np.isfinite(mean_a) and np.isfinite(mean_b)):
      raise ValueError(f"item {i}: non-finite similarity ({mean_a}, {mean_b})")
    choices.append("A" if mean_a > mean_b else "B" if mean_b > mean_a else None)
  return choices


def score_choices(items: Sequence[HPIRItem],
                  choices: Sequence[str | None]) -> dict[str, AspectScore]:
  """Per aspect, confidence-weighted agreement of `choices` (A/B/None=tie) with the labels."""
  if len(items) != len(choices):
    raise ValueError(f"{len(items)} items but {len(choices)} choices")
  out = {}
  for aspect in ASPECTS:
    hit, total, counted = 0.0, 0.0, 0
    for item, choice in zip(items, choices):
      label = item.labels.get(aspect)
      if label is None or label.confidence <= 0:
        continue
      credit = 0.5 if choice is None else float(choice == label.preferred)
      hit += label.confidence * credit
      total += label.confidence
      counted += 1
    out[aspect] = AspectScore(hit / total if total > 0 else float("nan"), counted, total)
  return out


def group_similarities(items: Sequence[HPIRItem], similarity_fn: SimilarityFn,
                       root: str | os.PathLike) -> list[GroupSimilarities]:
  """Calls `similarity_fn(query, paths)` on both groups of every item (paths resolved)."""
  out = []
  for item in items:
    paths_a, paths_b = item.paths(root)
    out.append((similarity_fn(item.query, paths_a), similarity_fn(item.query, paths_b)))
  return out


def score_hpir(items: Sequence[HPIRItem],
               similarities: Sequence[GroupSimilarities] | SimilarityFn,
               root: str | os.PathLike | None = None) -> dict[str, AspectScore]:
  """PAPER.md's HPIR score per aspect for one model.

  Args:
    items: the benchmark items (e.g. `load_hpir(path).items`).
    similarities: either, per item, (similarities of the query to group A's images, to group
      B's images), or a callable (query, image paths) -> similarity per image, which is
      called on both groups of each item.
    root: folder to resolve relative image references against; required with a callable
      (use `HPIRFile.root`).
  Returns:
    {"accuracy": AspectScore, "aesthetic": AspectScore}.
  """
  if callable(similarities):
    if root is None:
      raise ValueError("score_hpir: a similarity callable needs root (the JSONL's folder)")
    similarities = group_similarities(items, similarities, root)
  if len(similarities) != len(items):
    raise ValueError(f"{len(items)} items but {len(similarities)} similarity pairs")
  return score_choices(items, model_choices(similarities))
