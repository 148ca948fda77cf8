"""HPIR format: loader validation, writer round trip, and PAPER.md's confidence-weighted score."""

import json
import logging
import math
import re

import pytest

from aesalign_jax.evaluation import hpir
from aesalign_jax.evaluation.hpir import AspectLabel, HPIRFormatError, HPIRItem


def _item(acc="A", acc_conf=1.0, aes="A", aes_conf=1.0, **kw):
  return HPIRItem(query=kw.pop("query", "a red circle"),
                  group_a=kw.pop("group_a", ["a0.png", "a1.png"]),
                  group_b=kw.pop("group_b", ["b0.png", "b1.png"]),
                  labels={"accuracy": AspectLabel(acc, acc_conf),
                          "aesthetic": AspectLabel(aes, aes_conf)}, **kw)


def _good_line(**overrides):
  obj = {"id": "x", "query": "q", "group_a": ["a.png"], "group_b": ["b.png"],
         "labels": {"accuracy": {"preferred": "A", "confidence": 0.5},
                    "aesthetic": {"preferred": "B", "confidence": 1}}}
  obj.update(overrides)
  return json.dumps(obj)


def test_known_choices_give_known_confidence_weighted_scores():
  items = [_item("A", 1.0, "A", 0.2), _item("B", 0.5, "A", 0.8), _item("A", 0.25, "B", 1.0)]
  # Model picks A, A, B: accuracy right, wrong, wrong; aesthetic right, right, right.
  sims = [([0.9, 0.7], [0.1, 0.2]), ([0.5], [0.4]), ([0.1, 0.1, 0.1], [0.3])]
  scores = hpir.score_hpir(items, sims)
  assert scores["accuracy"].score == pytest.approx(1.0 / 1.75)
  assert scores["aesthetic"].score == pytest.approx(1.0)
  assert scores["accuracy"].items_counted == 3
  assert scores["accuracy"].total_confidence == pytest.approx(1.75)


def test_group_choice_uses_mean_not_max_similarity():
  # Group A has the single best image but the lower mean: the model must pick B.
  assert hpir.model_choices([([1.0, 0.0, 0.0], [0.5, 0.5])]) == ["B"]


def test_confidence_zero_items_do_not_count():
  base = [_item("A", 0.6, "B", 0.6)]
  sims = [([1.0], [0.0])]  # picks A: accuracy right, aesthetic wrong
  extra = [_item("B", 0.0, "A", 0.0)] * 5  # would flip both scores if they counted
  base_scores = hpir.score_hpir(base, sims)
  with_zero = hpir.score_hpir(base + extra, sims + [([1.0], [0.0])] * 5)
  for aspect in hpir.ASPECTS:
    assert with_zero[aspect].score == base_scores[aspect].score
    assert with_zero[aspect].items_counted == 1
  assert with_zero["accuracy"].score == 1.0 and with_zero["aesthetic"].score == 0.0


def test_all_zero_confidence_gives_nan_not_a_division_error():
  scores = hpir.score_hpir([_item("A", 0.0, "A", 0.0)], [([1.0], [0.0])])
  assert math.isnan(scores["accuracy"].score) and scores["accuracy"].items_counted == 0


def test_tied_group_means_earn_half_credit():
  scores = hpir.score_hpir([_item("A", 1.0, "B", 1.0)], [([0.3, 0.5], [0.4])])
  assert scores["accuracy"].score == 0.5 and scores["aesthetic"].score == 0.5


def test_item_labelling_one_aspect_counts_only_for_it():
  item = HPIRItem("q", ["a.png"], ["b.png"], {"aesthetic": AspectLabel("B", 1.0)})
  scores = hpir.score_hpir([item, _item("A", 1.0, "A", 1.0)], [([0], [1]), ([0], [1])])
  assert scores["accuracy"].items_counted == 1 and scores["accuracy"].score == 0.0
  assert scores["aesthetic"].items_counted == 2 and scores["aesthetic"].score == 0.5


def test_callable_similarity_gets_paths_resolved_against_the_file_folder(tmp_path):
  items = [_item("A", 1.0, "B", 1.0, group_a=["img/a.png", str(tmp_path / "abs.png")],
                 group_b=["img/b.png"], id="i0")]
  path = tmp_path / "bench" / "hpir.jsonl"
  hpir.write_hpir(path, items)
  loaded = hpir.load_hpir(path)
  seen = []

  def sim_fn(query, paths):
    seen.append((query, list(paths)))
    return [1.0 if p.name.startswith("a") else 0.0 for p in paths]

  scores = hpir.score_hpir(loaded.items, sim_fn, root=loaded.root)
  assert seen == [("a red circle", [tmp_path / "bench" / "img/a.png", tmp_path / "abs.png"]),
                  ("a red circle", [tmp_path / "bench" / "img/b.png"])]
  assert scores["accuracy"].score == 1.0 and scores["aesthetic"].score == 0.0
  with pytest.raises(ValueError, match="root"):
    hpir.score_hpir(loaded.items, sim_fn)


def test_write_then_load_round_trips_items_exactly(tmp_path):
  items = [_item("A", 0.75, "B", 0.0, id="q1", meta={"truth": [0.1, 0.9]}),
           _item("B", 1.0, "A", 0.5, id="q2", query="ein Kreis, grün ✓")]
  path = tmp_path / "h.jsonl"
  assert hpir.write_hpir(path, items) == 2
  loaded = hpir.load_hpir(path, strict=True)
  assert loaded.items == items and loaded.bad_lines == []


def test_missing_id_defaults_to_line_number(tmp_path):
  path = tmp_path / "h.jsonl"
  path.write_text("\n" + json.dumps(json.loads(_good_line()) | {"id": ""}) + "\n")
  assert hpir.load_hpir(path).items[0].id == "line-2"


MALFORMED = {
    "bad JSON": '{"query": "q", "group_a": [',
    "missing field": json.dumps({"query": "q", "group_a": ["a.png"],
                                 "labels": {"accuracy": {"preferred": "A", "confidence": 1}}}),
    "bad group label": _good_line(labels={"accuracy": {"preferred": "C", "confidence": 1}}),
    "confidence above 1": _good_line(labels={"accuracy": {"preferred": "A", "confidence": 1.5}}),
    "negative confidence": _good_line(labels={"aesthetic": {"preferred": "B", "confidence": -0.1}}),
    "confidence as string": _good_line(labels={"accuracy": {"preferred": "A", "confidence": "1"}}),
    "unknown aspect": _good_line(labels={"beauty": {"preferred": "A", "confidence": 1}}),
    "empty group": _good_line(group_b=[]),
    "not an object": "[1, 2, 3]",
}
EXPECTED_REASON = {"bad JSON": "bad JSON", "missing field": "group_b",
                   "bad group label": "preferred", "confidence above 1": r"\[0, 1\]",
                   "negative confidence": r"\[0, 1\]", "confidence as string": "finite number",
                   "unknown aspect": "beauty", "empty group": "group_b",
                   "not an object": "JSON object"}


def test_malformed_lines_are_skipped_counted_and_named_by_line_number(tmp_path, caplog):
  lines = [_good_line(id="first")]
  for bad in MALFORMED.values():
    lines.append(bad)
  lines.append(_good_line(id="last"))
  path = tmp_path / "h.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with caplog.at_level(logging.WARNING):
    loaded = hpir.load_hpir(path)
  assert [i.id for i in loaded.items] == ["first", "last"]
  assert [b.line_number for b in loaded.bad_lines] == list(range(2, 2 + len(MALFORMED)))
  for bad, name in zip(loaded.bad_lines, MALFORMED):
    assert re.search(EXPECTED_REASON[name], bad.reason), (name, bad.reason)
  warning = caplog.text
  assert str(path) in warning and f"skipped {len(MALFORMED)}" in warning
  assert "line 2:" in warning and f"line {1 + len(MALFORMED)}:" in warning


@pytest.mark.parametrize("name", list(MALFORMED))
def test_strict_mode_raises_naming_file_and_line(tmp_path, name):
  path = tmp_path / "h.jsonl"
  path.write_text(_good_line() + "\n\n" + MALFORMED[name] + "\n")
  with pytest.raises(HPIRFormatError, match=rf"h\.jsonl: line 3: .*{EXPECTED_REASON[name]}"):
    hpir.load_hpir(path, strict=True)


def test_non_utf8_line_is_reported_not_crashing(tmp_path):
  path = tmp_path / "h.jsonl"
  path.write_bytes(_good_line().encode() + b"\n\xff\xfe{\n")
  loaded = hpir.load_hpir(path)
  assert len(loaded.items) == 1 and loaded.bad_lines[0].line_number == 2
  assert "UTF-8" in loaded.bad_lines[0].reason


# --- mutation survivors (benchmarks/mutation.py): each test kills mutants the rest let live ---

def test_model_choices_refuse_an_empty_or_non_finite_group_on_either_side():
  for sims, reason in ((([], [0.5]), "empty"), (([0.5], []), "empty"),
                       (([float("nan")], [0.5]), "non-finite"),
                       (([0.5], [float("inf")]), "non-finite")):
    with pytest.raises(ValueError, match=f"item 0: {reason}"):
      hpir.model_choices([sims])


def test_a_label_is_frozen_once_validated():
  label = AspectLabel("A", 0.5)
  with pytest.raises(AttributeError):   # dataclasses.FrozenInstanceError
    label.confidence = 2.0
