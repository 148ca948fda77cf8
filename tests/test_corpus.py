"""input_pipeline/corpus.py: one interface for the embedded world and for file corpora, and the
stage graph that reads it (aesalign_jax/stages)."""

import json

import ml_collections
import numpy as np
import pytest
from absl import flags
from PIL import Image

from aesalign_jax import stages
from configs import default, real
from input_pipeline import corpus as corpus_lib
from input_pipeline import pipeline
from input_pipeline import world as world_lib

flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags

SMALL_WORLD = dict(num_train=300, num_eval=40, num_hpir_pool=0, num_queries=48,
                   num_eval_queries=12)


def _world_data():
  data = pipeline.default_config()
  data.source = 'world'
  world = world_lib.default_config()
  world.update(SMALL_WORLD)
  return data, world


def test_world_corpus_rows_are_the_training_split_with_its_ground_truth():
  data, world_config = _world_data()
  corpus = corpus_lib.open_corpus(data, world=world_config)
  world = world_lib.World(world_config)
  assert isinstance(corpus, corpus_lib.WorldCorpus) and len(corpus) == 300
  rows = np.array([0, 7, 299])
  np.testing.assert_array_equal(corpus.ids[rows], world.split_indices('train')[rows])
  images, valid = corpus.images(rows)
  np.testing.assert_array_equal(images, world.render_batch(rows))
  assert valid.all() and corpus.captions(rows) == world.captions(rows)
  np.testing.assert_array_equal(corpus.truth.aesthetic(rows), world.aesthetic(rows))
  query = world.mining_queries[0]
  np.testing.assert_array_equal(corpus.truth.relevant(query.text, np.arange(300)),
                                world.is_relevant(query, np.arange(300)))
  assert corpus.queries('mining') == [q.text for q in world.mining_queries]
  assert corpus_lib.open_corpus(data, world=world_config) is corpus   # opened once


def test_world_held_out_corpus_is_the_eval_split_with_the_eval_queries():
  data, world_config = _world_data()
  held = corpus_lib.open_corpus(data, world=world_config).held_out
  world = world_lib.World(world_config)
  assert held.name == 'world:eval:40' and held.held_out is None
  np.testing.assert_array_equal(held.ids, world.split_indices('eval'))
  np.testing.assert_array_equal(held.images([3])[0], world.render_batch([303]))
  assert held.queries('eval') == [q.text for q in world.eval_queries]
  np.testing.assert_array_equal(held.truth.aesthetic([0, 1]), world.aesthetic([300, 301]))


def test_world_is_a_source_like_the_others_and_needs_its_section():
  data, world_config = _world_data()
  split = pipeline.make_source(data, world_config)
  assert len(split) == 300 and split[5]['index'] == 5
  with pytest.raises(ValueError, match=r"config\.data\.source='world' needs the config's "
                                       r'`world` section'):
    pipeline.make_source(data)


@pytest.fixture
def jsonl_corpus(tmp_path):
  for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
    Image.new('RGB', (20, 12), colour).save(tmp_path / f'{i}.png')
  (tmp_path / 'broken.png').write_bytes(b'not an image')
  lines = [{'image': f'{i}.png', 'caption': f'picture {i}', 'id': f'p{i}'} for i in range(3)]
  lines.insert(1, {'image': 'broken.png', 'caption': 'broken', 'id': 'broken'})
  (tmp_path / 'c.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  data = pipeline.default_config()
  data.update(source='jsonl', path=str(tmp_path / 'c.jsonl'), image_size=8, read_threads=2)
  return data


def test_file_corpus_has_ids_images_and_captions_but_no_ground_truth(jsonl_corpus):
  corpus = corpus_lib.open_corpus(jsonl_corpus)
  assert isinstance(corpus, corpus_lib.SourceCorpus) and corpus.decodes_files
  assert corpus.ids.tolist() == ['p0', 'broken', 'p1', 'p2']
  images, valid = corpus.images([0, 1, 3])
  assert images.shape == (3, 8, 8, 3) and valid.tolist() == [True, False, True]
  assert tuple(images[2, 4, 4]) == (0, 0, 200) and not images[1].any()   # the broken one: black
  assert corpus.captions([2]) == ['picture 1']
  assert corpus.truth is None and corpus.held_out is None and corpus.queries('eval') == []
  failed = []
  corpus.reader(on_invalid=lambda row, error: failed.append(row))([1, 2])
  assert failed == [1] and corpus.stats()['skipped_at_read'] >= 1


def test_file_corpus_is_reopened_when_its_file_changes(jsonl_corpus):
  fingerprint = lambda path: open(path, 'rb').read()
  first = corpus_lib.open_corpus(jsonl_corpus, file_fingerprint=fingerprint)
  assert corpus_lib.open_corpus(jsonl_corpus, file_fingerprint=fingerprint) is first
  with open(jsonl_corpus.path, 'a') as f:
    f.write(json.dumps({'image': '0.png', 'caption': 'again', 'id': 'p9'}) + '\n')
  again = corpus_lib.open_corpus(jsonl_corpus, file_fingerprint=fingerprint)
  assert again is not first and again.ids.tolist()[-1] == 'p9'


def test_file_corpus_pairs_stream_skips_the_undecodable_image(jsonl_corpus):
  corpus = corpus_lib.SourceCorpus(jsonl_corpus, str)
  it = iter(corpus.pairs_pipeline(lambda texts: {'ids': np.zeros((len(texts), 4), np.int32)},
                                  batch_size=2, seed=0, data=jsonl_corpus))
  ids = {i for _ in range(4) for i in next(it)['id']}
  assert ids == {'p0', 'p1', 'p2'}


@pytest.fixture
def csv_with_a_repeat(tmp_path):
  """A CSV without an id column listing one image twice: its id (the path) repeats."""
  for name in ('a.png', 'b.png'):
    Image.new('RGB', (8, 8), (9, 9, 9)).save(tmp_path / name)
  (tmp_path / 'dup.csv').write_text('image,caption\na.png,one\nb.png,two\n\na.png,one again\n')
  data = pipeline.default_config()
  data.update(source='csv', path=str(tmp_path / 'dup.csv'), image_size=8)
  return data


def test_corpus_whose_ids_repeat_is_refused_when_opened_naming_id_count_and_lines(
    csv_with_a_repeat):
  path = csv_with_a_repeat.path
  with pytest.raises(ValueError) as refused:
    corpus_lib.open_corpus(csv_with_a_repeat)
  message = str(refused.value)
  assert f"config.data.path={path!r}: id 'a.png' names 2 records ({path}:2, {path}:5)" in message
  assert 'ids must be unique' in message


def test_stage_runner_refuses_a_corpus_whose_ids_repeat_before_any_stage(
    csv_with_a_repeat, monkeypatch, tmp_path):
  calls = []
  for name, module in stages.STAGES.items():
    monkeypatch.setattr(module, 'run', lambda ctx, inputs, name=name: calls.append(name))
  config = default.get_config('smoke')
  config.data = csv_with_a_repeat
  with pytest.raises(ValueError, match="id 'a.png' names 2 records"):
    stages.start(config, str(tmp_path), mesh=object())
  with pytest.raises(ValueError, match="id 'a.png' names 2 records"):
    stages.run('all', config, str(tmp_path), mesh=object())
  assert calls == []


def test_subset_corpus_maps_rows_to_the_base_corpus_and_its_truth():
  data, world_config = _world_data()
  base = corpus_lib.open_corpus(data, world=world_config)
  rows = np.array([5, 2, 9])
  sub = corpus_lib.SubsetCorpus(base, rows, {'n': 3})
  np.testing.assert_array_equal(sub.ids, base.ids[rows])
  np.testing.assert_array_equal(sub.images([1])[0], base.images([2])[0])
  np.testing.assert_array_equal(sub.truth.aesthetic([0, 2]), base.truth.aesthetic([5, 9]))
  assert sub.captions([2]) == base.captions([9]) and sub.summary == {'n': 3}


def test_stages_are_declared_in_an_order_that_runs_what_each_needs_first():
  config = default.get_config('smoke')
  for position, name in enumerate(stages.ORDER):
    assert all(stages.ORDER.index(dep) < position for dep in stages.needs(name, config)), name
  assert stages.needs('align', config) == ('pretrain', 'mine')
  config.align.dpo_path = '/data/dpo.parquet'   # D_po given: nothing to mine
  assert stages.needs('align', config) == ('pretrain',)
  assert stages.MODES == ('all',) + stages.ORDER + ('serve',)   # serve: no stage (serve.py)


def test_stage_runner_runs_each_needed_stage_once_in_order(monkeypatch, tmp_path):
  calls = []
  for name, module in stages.STAGES.items():
    monkeypatch.setattr(module, 'run', lambda ctx, inputs, name=name: (
        calls.append((name, sorted(inputs))) or f'{name}-out'))
  stages.run('export', default.get_config('smoke'), str(tmp_path), mesh=object())
  assert calls == [('tokenizer', []), ('pretrain', ['tokenizer']), ('aesthetic', ['pretrain']),
                   ('mine', ['aesthetic', 'pretrain']), ('align', ['mine', 'pretrain']),
                   ('export', ['align'])]
  with pytest.raises(ValueError, match="--mode='report'"):
    stages.run('report', default.get_config('smoke'), str(tmp_path), mesh=object())
  with pytest.raises(ValueError, match="--mode='serve'"):   # main.py serves; no stage runs
    stages.run('serve', default.get_config('smoke'), str(tmp_path), mesh=object())


def test_real_config_has_no_world_sections():
  config = real.get_config('model=vit_b32,mesh=gpu')
  assert not {'world', 'world_iap', 'hpir_world'} & set(config)
  assert {'world', 'world_iap', 'hpir_world'} <= set(default.get_config())
  assert isinstance(config.retrieval, ml_collections.ConfigDict)
