"""preference.py: the D_po record, its ArrayRecord / Parquet files, the preference-group
pipeline, and the world's ground-truth groups."""

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from absl import flags
from array_record.python import array_record_module

from aesalign_jax import losses
from aesalign_jax import tokenizer as tokenizer_lib
from input_pipeline import preference as pref
from input_pipeline import world_groups as world_groups_lib
from input_pipeline.world import World

flags.FLAGS.mark_as_parsed()  # grain reads absl flags

FORMATS = ("arrayrecord", "parquet")
U, V = 3, 4


def fake_reference(texts, ids):
  """A deterministic stand-in for the reference model's cosine similarities, [G, N]."""
  return np.array([[np.float32(np.sin(int(i) + len(t))) for i in row]
                   for t, row in zip(texts, ids)], np.float32)


@pytest.fixture(scope="module")
def world():
  return World(num_train=20_000, num_eval=50, num_hpir_pool=50)


@pytest.fixture(scope="module")
def groups(world):
  return world_groups_lib.world_groups(world, world.mining_queries[:24], u=U, v=V, stride=2,
                           ref_score_fn=fake_reference, rng=0)


@pytest.fixture(scope="module")
def tokenizer(world, tmp_path_factory):
  texts = [q.text for q in world.queries]
  return tokenizer_lib.train_bpe(texts, 300, tmp_path_factory.mktemp("bpe"), context_length=12)


def _group(**changes):
  """A small valid 2 x 2 group; `changes` override its to_dict() fields."""
  d = dict(query="a red square", rephrased_query="a red square, sharp, soft light",
           image_ids=["a", "b", "c", "d"], aesthetic_scores=[0.9, 0.2, 0.7, 0.1],
           semantic_scores=[0.8, 0.8, 0.3, 0.1], ref_scores=[0.31, 0.29, 0.1, 0.05],
           u=2, v=2, stride=3, meta={})
  d.update(changes)
  return d


def _raw_arrayrecord(path, payloads):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for p in payloads:
    writer.write(p if isinstance(p, bytes) else json.dumps(p).encode())
  writer.close()


def _bits(x):
  return np.asarray(x, np.float64).view(np.int64)


# ------------------------------------------------------------------------------ records, files

@pytest.mark.parametrize("fmt", FORMATS)
def test_both_formats_round_trip_every_field_exactly(fmt, groups, tmp_path):
  awkward = pref.PreferenceGroup(**_group(
      query="café ☕ \"quoted\"", image_ids=["x/1.jpg", "ü", "3", "é"],
      aesthetic_scores=[1 / 3, 1e-310, float(np.float32(0.1)), -2.5],
      ref_scores=np.array([0.1, -0.7, 1e300, 5e-324], np.float64),
      meta={"nested": {"list": [1, 2.5, None, "s"]}, "flag": True}))
  for name, written in (("world", groups), ("awkward", [awkward])):
    path = tmp_path / f"{name}.{fmt}"
    assert pref.write_groups(path, written) == len(written)
    source = pref.open_groups(path)
    assert len(source) == len(written) and source.stats()["skipped_at_index"] == 0
    for i, group in enumerate(written):
      back = source[i]
      assert back == group
      for field in pref.SCORE_FIELDS:  # bit for bit, not just ==
        np.testing.assert_array_equal(_bits(getattr(back, field)), _bits(getattr(group, field)))
      assert back.image_ids == group.image_ids and back.meta == group.meta
      assert (back.query, back.rephrased_query, back.stride) == (
          group.query, group.rephrased_query, group.stride)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failed_write_leaves_no_file_and_keeps_an_older_one(fmt, groups, tmp_path):
  path = tmp_path / f"dpo.{fmt}"
  pref.write_groups(path, groups[:2])
  bad = groups[2].to_dict()
  bad["ref_scores"][5] = float("nan")
  with pytest.raises(pref.PreferenceGroupError, match=r"record 3: field 'ref_scores'.*finite"):
    pref.write_groups(path, [*groups[:3], bad, *groups[4:]])
  assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind
  older = pref.open_groups(path)
  assert [older[i] for i in range(len(older))] == groups[:2]

  fresh = tmp_path / f"fresh.{fmt}"
  with pytest.raises(RuntimeError, match="crash"):
    with pref.GroupWriter(fresh) as writer:
      writer.write(groups[0])
      raise RuntimeError("crash mid-way")
  assert sorted(os.listdir(tmp_path)) == [path.name]


def test_open_refuses_a_missing_path_naming_it_and_the_config_key(tmp_path):
  missing = tmp_path / "mined" / "dpo.arrayrecord"
  with pytest.raises(FileNotFoundError, match=r"dpo\.arrayrecord.*align\.dpo_path"):
    pref.open_groups(missing)
  (tmp_path / "dpo.json").write_text("{}")
  with pytest.raises(ValueError, match=r"dpo\.json.*align\.dpo_path.*extension"):
    pref.open_groups(tmp_path / "dpo.json")


def test_open_refuses_records_whose_grid_differs(tmp_path):
  path = tmp_path / "mixed.arrayrecord"
  other = _group(u=1, v=4, semantic_scores=[0.8] * 4, aesthetic_scores=[0.9, 0.7, 0.2, 0.1])
  _raw_arrayrecord(path, [_group(), _group(), other])
  with pytest.raises(ValueError, match=r"align\.dpo_path.*record 2: u=1, v=4.*record 0's u=2, "
                                       r"v=2"):
    pref.open_groups(path)

  same = tmp_path / "same.parquet"
  pref.write_groups(same, [_group(), _group(query="a blue star")])
  assert len(pref.open_groups(same, expect_uv=(2, 2))) == 2
  assert len(pref.open_groups(same, expect_uv=4)) == 2
  with pytest.raises(ValueError, match=r"record 0: u=2, v=2.*expects u=5, v=5"):
    pref.open_groups(same, expect_uv=(5, 5))
  with pytest.raises(ValueError, match=r"record 0: u=2, v=2 \(u\*v=4\).*expects u\*v = 25"):
    pref.open_groups(same, expect_uv=25)
  with pytest.raises(pref.PreferenceGroupError, match=r"record 1: field 'u'.*u=1, v=4"):
    pref.write_groups(tmp_path / "mixed.parquet", [_group(), other])


@pytest.mark.parametrize("field, value, reason", [
    ("query", "  ", "non-empty string"),
    ("rephrased_query", None, "non-empty string"),
    ("image_ids", ["a", "b", "c"], "u\\*v = 2\\*2 = 4 ids, got 3"),
    ("image_ids", ["a", "b", "a", "d"], "'a' occurs twice"),
    ("image_ids", ["a", "b", "", "d"], "position 2"),
    ("aesthetic_scores", [0.9, 0.2, 0.7], "u\\*v = 4 numbers"),
    ("semantic_scores", [0.8, float("inf"), 0.3, 0.1], "finite.*position 1"),
    ("ref_scores", [0.1, "high", 0.2, 0.3], "list of numbers"),
    ("aesthetic_scores", [0.2, 0.9, 0.7, 0.1], "row 0 is not sorted best first"),
    ("semantic_scores", [0.8, 0.2, 0.3, 0.1], "ordered by semantics: row 0"),
    ("u", 0, "positive int"),
    ("stride", 1.5, "positive int"),
    ("meta", {"x": float("nan")}, "JSON object of finite values"),
])
def test_invalid_records_are_refused_naming_the_field(field, value, reason):
  with pytest.raises(pref.PreferenceGroupError, match=f"field '{field}': .*{reason}") as e:
    pref.PreferenceGroup(**_group(**{field: value}))
  assert e.value.field == field
  with pytest.raises(pref.PreferenceGroupError, match=f"record 7: field '{field}'"):
    pref.as_group(_group(**{field: value}), record=7)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_records_in_a_file_are_skipped_counted_and_named(fmt, tmp_path, caplog):
  path = tmp_path / f"dpo.{fmt}"
  good, other = _group(), _group(query="a blue star")
  not_finite = _group(ref_scores=[0.1, None, 0.0, 0.0])
  if fmt == "arrayrecord":
    _raw_arrayrecord(path, [good, b"\xff not json", not_finite, other])
  else:  # written around the writer's validation, as a foreign tool might
    rows = [{**r, "meta": m} for r, m in ((good, "{}"), (good, "{not json"),
                                          (not_finite, "{}"), (other, "{}"))]
    pq.write_table(pa.Table.from_pylist(rows, schema=pref.parquet_schema()), path)
  with caplog.at_level(logging.WARNING):
    source = pref.open_groups(path)
  assert len(source) == 2 and source[0] == pref.PreferenceGroup(**good)
  assert source[1] == pref.PreferenceGroup(**other) and source.record_number(1) == 3
  assert source.stats()["skipped_by_kind"] == {"undecodable_record": 1, "invalid_record": 1}
  assert f"dpo.{fmt} record 1: undecodable_record" in caplog.text
  assert f"dpo.{fmt} record 2: invalid_record: field 'ref_scores'" in caplog.text


# ------------------------------------------------------------------------------ world groups

def test_semantic_grades_are_full_exactly_when_the_world_says_relevant(world):
  indices = world.split_indices("train")[:5000]
  scene = world.scene(indices)
  queries = world.queries[::5]
  for query, relevant in zip(queries, world.relevance(queries, indices)):
    grade, full = world_groups_lib.semantic_grades(query, scene)
    np.testing.assert_array_equal(grade == full, relevant)
    assert grade.min() == 0 and set(np.unique(grade)) == set(range(full + 1))


def test_world_groups_are_in_grid_order(world, groups):
  assert len(groups) == 24  # 20k training images fill every grid
  start, stop = world.split_range("train")
  for group in groups:
    assert (group.u, group.v, group.stride) == (U, V, 2)
    index = np.array([int(i) for i in group.image_ids])
    assert len(set(index)) == U * V and ((start <= index) & (index < stop)).all()
    truth = world.aesthetic(index)
    np.testing.assert_array_equal(group.aesthetic_scores, truth)
    np.testing.assert_array_equal(group.meta["gt_aesthetic"], truth)
    aesthetic = truth.reshape(U, V)
    assert (np.diff(aesthetic, axis=1) < 0).all()  # each row best first
    assert (np.diff(aesthetic, axis=0) < 0).all()  # and each column too (see world_groups)
    semantic = group.semantic_scores.reshape(U, V)
    assert (semantic.min(axis=1)[:-1] >= semantic.max(axis=1)[1:]).all()
    relevant = world.is_relevant(_query(world, group.query), index).reshape(U, V)
    assert relevant[0].all() and not relevant[-1].any()  # row 0 matches, the last does not
    assert (semantic[-1] == 0).all() and (semantic[0] == 1).all()
    np.testing.assert_array_equal(
        group.ref_scores, fake_reference([group.query], [group.image_ids])[0])
  again = world_groups_lib.world_groups(world, world.mining_queries[:24], u=U, v=V, stride=2,
                            ref_score_fn=fake_reference, rng=0)
  assert again == groups  # deterministic in rng


def _query(world, text):
  return next(q for q in world.queries if q.text == text)


def test_product_pairs_prefer_images_at_least_as_good_on_both_ground_truth_axes(world, groups):
  mask = losses.pair_mask(U, V, "product")
  k, l = np.nonzero(mask)
  strictly_more_relevant = strictly_prettier = 0
  for group in groups:
    grade = np.asarray(group.meta["gt_grade"])
    truth = np.asarray(group.meta["gt_aesthetic"])
    relevant = world.is_relevant(_query(world, group.query),
                                 np.array(group.meta["world_index"]))
    assert (grade[k] >= grade[l]).all() and (relevant[k] >= relevant[l]).all()
    assert (truth[k] >= truth[l]).all()
    strictly_more_relevant += int((relevant[k] > relevant[l]).sum())
    strictly_prettier += int((truth[k] > truth[l]).sum())
  # Not vacuous: many pairs are strict on each axis (measured per group: 20 and 48 of 48).
  assert strictly_more_relevant > len(groups) * 10 and strictly_prettier > len(groups) * 30


# ------------------------------------------------------------------------------ the pipeline

def _pipe(source, world, tokenizer, **kw):
  args = dict(batch_size=3, seed=5, read_threads=2, shard_index=0, shard_count=1)
  args.update(kw)
  return pref.make_preference_pipeline(source, pref.world_image_lookup(world), tokenizer,
                                       **args)


def test_pipeline_yields_the_documented_batches(world, groups, tokenizer, tmp_path):
  path = tmp_path / "dpo.arrayrecord"
  pref.write_groups(path, groups)
  it = iter(_pipe(pref.open_groups(path, expect_uv=(U, V)), world, tokenizer))
  batch = next(it)
  it.close()
  g, n, s, length = 3, U * V, world.image_size, tokenizer.context_length
  expected = {"images": (np.uint8, (g, n, s, s, 3)), "ids": (np.int32, (g, length)),
              "eos_index": (np.int32, (g,)), "ref_scores": (np.float32, (g, n)),
              "aesthetic_scores": (np.float32, (g, n)), "semantic_scores": (np.float32, (g, n))}
  assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected
  by_ref = {group.ref_scores.astype(np.float32).tobytes(): group for group in groups}
  for row in range(g):  # every row of the batch is one group's images, text and scores
    group = by_ref[batch["ref_scores"][row].tobytes()]
    np.testing.assert_array_equal(batch["images"][row],
                                  world.render_batch([int(i) for i in group.image_ids]))
    tokens = tokenizer([group.query])
    np.testing.assert_array_equal(batch["ids"][row], tokens["ids"][0])
    assert batch["eos_index"][row] == tokens["eos_index"][0]
    np.testing.assert_array_equal(batch["aesthetic_scores"][row],
                                  group.aesthetic_scores.astype(np.float32))


def test_pipeline_iterator_state_restores_exactly(world, groups, tokenizer):
  it = iter(_pipe(groups, world, tokenizer, batch_size=4))
  for _ in range(4):  # an epoch is 24 / 4 = 6 batches
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable, as orbax stores it
  expected = [next(it) for _ in range(4)]  # crosses into the second epoch
  it.close()
  resumed = iter(_pipe(groups, world, tokenizer, batch_size=4))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  resumed.close()


def test_pipeline_with_worker_processes_yields_the_same_batches(world, groups, tokenizer,
                                                                 tmp_path):
  path = tmp_path / "dpo.arrayrecord"
  pref.write_groups(path, groups)
  source = pref.open_groups(path)  # source and lookup pickle into the worker
  batches = []
  for workers in (0, 1):
    it = iter(_pipe(source, world, tokenizer, worker_count=workers))
    batches.append([next(it) for _ in range(2)])
    it.close()
  for in_process, in_worker in zip(*batches):
    for key in in_process:
      np.testing.assert_array_equal(in_worker[key], in_process[key])


class ToyCorpus:
  """An id-keyed corpus source like sources.py's: record i has id f'img{i}', image filled i."""

  def __init__(self, n, bad=()):
    self.n, self.bad = n, set(bad)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((4, 4, 3), i, np.uint8), "caption": "", "id": f"img{i}",
            "valid": i not in self.bad, "error": f"img{i}.jpg: undecodable_image: truncated"}


def test_groups_with_a_missing_or_broken_image_are_dropped_and_reported(tokenizer, tmp_path):
  def group(q, ids):
    return _group(query=q, image_ids=ids)
  path = tmp_path / "dpo.parquet"
  pref.write_groups(path, [group("a red square", ["img0", "img1", "img2", "img3"]),
                           group("a blue star", ["img4", "img5", "nowhere", "img6"]),
                           group("a pink cross", ["img7", "img8", "img9", "img1"]),
                           group("a green circle", ["img3", "img2", "img1", "img0"])])
  source = pref.open_groups(path)
  lookup = pref.source_image_lookup(ToyCorpus(10, bad={9}))
  ds = pref.make_preference_pipeline(source, lookup, tokenizer, batch_size=1, seed=0,
                                     shuffle=False, num_epochs=1, read_threads=1,
                                     shard_index=0, shard_count=1)
  batches = list(ds)
  firsts = [int(b["images"][0, 0, 0, 0, 0]) for b in batches]
  assert firsts == [0, 3]  # the groups of queries 0 and 3, in file order
  np.testing.assert_array_equal(batches[1]["images"][0, :, 0, 0, 0], [3, 2, 1, 0])
  stats = source.stats()
  assert stats["skipped_at_read"] == 2 and stats["skipped_by_kind"] == {"missing_image": 2}
  errors = " ".join(s.detail for s in source.skipped)
  assert "'nowhere' is not in" in errors and "img9.jpg: undecodable_image" in errors


def test_source_image_lookup_refuses_duplicate_ids():
  corpus = ToyCorpus(3)
  with pytest.raises(ValueError, match="'dup' names records 0 and 2"):
    pref.source_image_lookup(corpus, ids=["dup", "b", "dup"])


def test_pipeline_refuses_a_group_of_another_grid(tokenizer):
  groups = [pref.PreferenceGroup(**_group(image_ids=["img0", "img1", "img2", "img3"])),
            pref.PreferenceGroup(**_group(u=1, v=4, image_ids=["img4", "img5", "img6", "img7"],
                                          semantic_scores=[0.5] * 4,
                                          aesthetic_scores=[0.9, 0.7, 0.2, 0.1]))]
  ds = pref.make_preference_pipeline(groups, pref.source_image_lookup(ToyCorpus(10)), tokenizer,
                                     batch_size=2, seed=0, shuffle=False, read_threads=1,
                                     shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=r"'a red square' has u=1, v=4.*first group has u=2, v=2"):
    next(iter(ds))


# ------------------------------------------------------------------------------ mutation survivors
# Each test below kills mutants the rest of this file let live (benchmarks/mutation.py).

def test_a_group_is_frozen_its_scores_read_only_and_stride_defaults_to_one():
  group = pref.PreferenceGroup(**_group())
  with pytest.raises(ValueError, match="read-only"):
    group.aesthetic_scores[0] = 1.0
  with pytest.raises(AttributeError):   # dataclasses.FrozenInstanceError
    group.query = "another query"
  record = _group()
  del record["stride"], record["meta"]
  loaded = pref.PreferenceGroup.from_dict(record)
  assert (loaded.stride, loaded.meta) == (1, {})
  assert (group == "a red square") is False and group != "a red square"


@pytest.mark.parametrize("value, reason", [
    ("abcd", "list of strings, got str"),         # a str is a Sequence, of characters
    ({"a", "b", "c", "d"}, "list of strings, got set"),
    (["a", "b", "c", "b"], "'b' occurs twice"),   # names the repeated id, not the first
])
def test_image_ids_must_be_a_list_of_distinct_strings(value, reason):
  with pytest.raises(pref.PreferenceGroupError, match=f"field 'image_ids': .*{reason}"):
    pref.PreferenceGroup(**_group(image_ids=value))


def test_grid_order_allows_ties_and_rising_columns_but_not_rising_rows():
  for changes in (dict(aesthetic_scores=[0.9, 0.9, 0.7, 0.1]),   # a tie within a row
                  dict(aesthetic_scores=[0.5, 0.2, 0.9, 0.1]),   # a column may rise
                  dict(semantic_scores=[0.9, 0.8, 0.3, 0.1]),    # semantics vary in a row
                  dict(semantic_scores=[0.8, 0.5, 0.5, 0.1])):   # rows tie at the boundary
    pref.PreferenceGroup(**_group(**changes))
  with pytest.raises(pref.PreferenceGroupError, match="row 1 is not sorted best first"):
    pref.PreferenceGroup(**_group(aesthetic_scores=[0.9, 0.8, 0.1, 0.7]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_closed_or_aborted_writer_refuses_more_writes(fmt, tmp_path):
  path = tmp_path / f"dpo.{fmt}"
  writer = pref.GroupWriter(path)
  writer.write(_group())
  assert writer.close() == str(path)
  with pytest.raises(RuntimeError, match="is closed"):
    writer.write(_group())
  aborted = pref.GroupWriter(tmp_path / f"aborted.{fmt}")
  aborted.abort()
  aborted.abort()   # safe twice
  with pytest.raises(RuntimeError, match="is closed"):
    aborted.write(_group())
  assert sorted(p.name for p in tmp_path.iterdir()) == [f"dpo.{fmt}"]
  source = pref.open_groups(path)
  assert repr(source) == f"PreferenceGroupSource({str(path)!r}, 1 groups, u=2, v=2)"


def test_the_skipped_records_warning_counts_them_of_all_records(tmp_path, caplog):
  path = tmp_path / "dpo.parquet"
  rows = [_group(), _group(ref_scores=[0.1, None, 0.0, 0.0]), _group(query="a blue star")]
  pq.write_table(pa.Table.from_pylist([{**r, "meta": "{}"} for r in rows],
                                      schema=pref.parquet_schema()), path)
  with caplog.at_level(logging.WARNING):
    assert len(pref.open_groups(path)) == 2
  assert "skipped 1 of 3 records" in caplog.text
