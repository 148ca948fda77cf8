"""The pretrain, mine, align and eval stages on real files: a JSON Lines corpus of PNGs (one
of them corrupt), queries files (mining, held out), a CLIP checkpoint folder with its
tokenizer, an IAP head that reads ANOTHER CLIP's embeddings and an HPIR-format file, all run
from configs/real.py shrunk to tiny shapes."""

import json

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from aesalign_jax import config_checks, embed, mining, stages
from aesalign_jax.stages import context
from aesalign_jax import tokenizer as tokenizer_lib
from aesalign_jax.aesthetics import iap
from aesalign_jax.evaluation import common, hpir, topk_quality
from aesalign_jax.models import clip, hf
from aesalign_jax.retrieval import index as retrieval_index
from configs import real
from input_pipeline import images as images_lib
from input_pipeline import corpus as corpus_lib
from input_pipeline import preference, sources

COLOURS = {'red': (220, 30, 30), 'green': (30, 180, 60), 'blue': (40, 60, 220),
           'yellow': (230, 210, 40)}
SHAPES = ('square', 'stripe', 'dot', 'frame')
QUERIES = ['a red square', 'a green stripe', 'a blue dot', 'a yellow frame', 'a red dot',
           'a blue square']
# Held-out queries for the eval stage; the last one is also a mining query (counted, warned).
EVAL_QUERIES = ['a green square', 'a yellow dot', 'a blue stripe', 'a red frame', QUERIES[0]]
TINY = dict(patch_size=16, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64,
            text_width=32, text_layers=1, text_heads=2, text_mlp=64, context_length=16)


def _picture(colour, shape, rng):
  """A small RGB picture of a coloured shape on a noisy grey background, 36 x 44 (not square:
  the source resizes and crops it to the model's 32 x 32)."""
  image = rng.integers(90, 160, size=(36, 44, 3)).astype(np.uint8)
  c = np.asarray(COLOURS[colour], np.uint8)
  if shape == 'square':
    image[8:28, 12:32] = c
  elif shape == 'stripe':
    image[14:22, :] = c
  elif shape == 'dot':
    yy, xx = np.mgrid[:36, :44]
    image[(yy - 18) ** 2 + (xx - 22) ** 2 < 64] = c
  else:
    image[4:32, 6:38] = c
    image[8:28, 10:34] = 128
  return image


def _random_params(cfg, seed):
  """A random CLIP's parameters drawn with numpy (clip.init_params runs eagerly: ~10 s here)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, np.float32)
    if name.endswith("['bias']"):
      return np.zeros(leaf.shape, np.float32)
    if name == "['logit_scale']":
      return np.asarray(np.log(1 / 0.07), np.float32)
    std = leaf.shape[-2] ** -0.5 if name.endswith("['kernel']") else 0.05
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, clip.abstract_params(cfg))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """The inputs of a real run, written as a user would have them."""
  root = tmp_path_factory.mktemp('real_inputs')
  rng = np.random.default_rng(0)
  (root / 'images').mkdir()
  lines, captions = [], []
  for i in range(64):
    colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 4]
    Image.fromarray(_picture(colour, shape, rng)).save(root / 'images' / f'img{i:02d}.png')
    caption = f'a {colour} {shape} photo number {i}'
    captions.append(caption)
    lines.append({'image': f'images/img{i:02d}.png', 'caption': caption, 'id': f'img{i:02d}'})
  (root / 'images' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not a png' * 20)
  lines.insert(10, {'image': 'images/broken.png', 'caption': 'a red square, broken',
                    'id': 'broken'})
  (root / 'corpus.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  (root / 'queries.txt').write_text('\n'.join(QUERIES + ['', QUERIES[0]]) + '\n')
  (root / 'eval_queries.jsonl').write_text(
      ''.join(json.dumps({'query': q}) + '\n' for q in EVAL_QUERIES))
  # HPIR-format comparisons on corpus images (36 x 44: the evaluator crops them to 32); the
  # third names a missing image, so it is skipped and counted.
  label = lambda a, b: {'accuracy': {'preferred': a, 'confidence': 1.0},
                        'aesthetic': {'preferred': b, 'confidence': 0.5}}
  items = [{'query': 'a red square', 'group_a': ['images/img00.png', 'images/img04.png'],
            'group_b': ['images/img01.png', 'images/img06.png'], 'labels': label('A', 'B')},
           {'query': 'a blue dot', 'group_a': ['images/img09.png'],
            'group_b': ['images/img10.png'], 'labels': label('B', 'A')},
           {'query': 'a red dot', 'group_a': ['images/missing.png'],
            'group_b': ['images/img08.png'], 'labels': label('A', 'A')}]
  (root / 'hpir.jsonl').write_text(''.join(json.dumps(i) + '\n' for i in items))

  clip_dir = root / 'clip'   # the checkpoint: HF weights + config.json + its tokenizer
  tok = tokenizer_lib.train_bpe(captions + QUERIES, vocab_size=320, folder=clip_dir,
                                context_length=16)
  cfg = clip.preset('tiny', **TINY, embed_dim=32, vocab_size=tok.vocab_size,
                    eos_token_id=tok.eos_token_id)
  hf.save_hf_folder(cfg, _random_params(cfg, 0), str(clip_dir))
  # The aesthetic head's own CLIP: another width (24) and resolution (48 px) than the model.
  iap_cfg = clip.preset('tiny', **TINY, image_size=48, embed_dim=24,
                        vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id)
  hf.save_hf_folder(iap_cfg, _random_params(iap_cfg, 1), str(root / 'iap_clip'))
  iap.save_params(root / 'iap.safetensors', iap.init_params(2, embed_dim=24))
  return root


def _config(files, **pretrain):
  """configs/real.py with its inputs pointed at `files` and every shape shrunk."""
  c = real.get_config('model=vit_b32,mesh=gpu')
  c.model.hf_folder = c.tokenizer.folder = str(files / 'clip')
  c.model.dtype = 'float32'
  c.model.remat = False
  c.data.path = str(files / 'corpus.jsonl')
  c.data.image_size = 32
  c.data.worker_count = 0
  c.data.read_threads = 2
  c.mine.queries_path = str(files / 'queries.txt')
  c.mine.top_k = 16
  c.mine.stride = 2
  c.retrieval.approx = False
  c.aesthetics.iap.weights = str(files / 'iap.safetensors')
  c.aesthetics.iap.clip_folder = str(files / 'iap_clip')
  c.aesthetics.iap.embed_dim = 24
  c.rephrase.backend = 'lexicon'   # offline; the LLM backends have their own tests
  c.rephrase.model = ''
  for section in ('pretrain', 'align'):
    s = c[section]
    s.steps, s.log_every, s.checkpoint_every = 2, 1, 2
    s.async_checkpoints = False
    s.optim.warmup_steps = 1
  c.pretrain.batch_size = 16
  c.pretrain.update(pretrain)
  c.align.batch_size, c.align.groups_per_step, c.align.u, c.align.v = 8, 2, 2, 2
  for e in c.evals.values():
    e.enabled = False   # the eval stage is not run here
  return c


def _summary(workdir, stage):
  return json.loads((workdir / stage / 'stage.json').read_text())['summary']


@pytest.fixture(scope='module')
def run(files, tmp_path_factory):
  """pretrain, mine and align (2 steps) on the files, as `main.py --mode=align`. pretrain.steps
  = 0 (the checkpoint is the PT model) saves compiling a second train step; the stream it
  would train on is tested below, and align trains on pairs of the same stream."""
  config = _config(files, steps=0)
  config_checks.validate(config, num_devices=1)   # a real config is no longer refused
  workdir = tmp_path_factory.mktemp('real_run')
  stages.run('align', config, str(workdir))
  return config, workdir


def test_training_pairs_stream_the_corpus_tokenised_skipping_the_corrupt_image(run, files):
  config, _ = run
  corpus = corpus_lib.SourceCorpus(config.data, str)   # a source of its own: its own counts
  source = corpus.source
  tok = tokenizer_lib.ClipTokenizer.from_folder(files / 'clip')
  it = iter(corpus.pairs_pipeline(tok, batch_size=16, seed=0, data=config.data))
  batches = [next(it) for _ in range(5)]   # 80 records: the whole corpus read at least once
  assert batches[0]['image'].shape == (16, 32, 32, 3) and batches[0]['image'].dtype == np.uint8
  assert batches[0]['ids'].shape == (16, 16) and batches[0]['eos_index'].shape == (16,)
  ids = {i for b in batches for i in b['id']}
  assert 'broken' not in ids and len(ids) == 64
  assert source.stats()['skipped_at_read'] == 1
  assert source.stats()['skipped_by_kind'] == {'undecodable_image': 1}


def test_zero_pretrain_steps_make_the_checkpoint_itself_the_pretrained_model(run, files):
  _, workdir = run
  assert _summary(workdir, 'pretrain')['steps'] == 0
  assert not (workdir / 'pretrain' / 'checkpoints').exists()   # nothing trained
  _, start = hf.load_hf_folder(str(files / 'clip'))
  _, copied = hf.load_hf_folder(str(workdir / 'pretrain' / 'model'))
  for a, b in zip(*(sorted(_leaves(p)) for p in (start, copied))):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
  tok = tokenizer_lib.ClipTokenizer.from_folder(workdir / 'pretrain' / 'model')
  assert tok(QUERIES)['ids'].tolist() == (
      tokenizer_lib.ClipTokenizer.from_folder(files / 'clip')(QUERIES)['ids'].tolist())


def test_mining_skips_and_counts_the_corrupt_image(run):
  _, workdir = run
  s = _summary(workdir, 'mine')
  assert (s['corpus_records'], s['corpus_unreadable'], s['corpus_indexed']) == (65, 1, 64)
  logged = [json.loads(l) for l in (workdir / 'mine' / 'unreadable.jsonl').read_text().split('\n')
            if l]
  assert [e['id'] for e in logged] == ['broken'] and 'broken.png' in logged[0]['error']


def test_dpo_records_name_real_corpus_ids_for_every_query_of_the_file(run, files):
  _, workdir = run
  s = _summary(workdir, 'mine')
  assert s['queries'] == len(QUERIES)           # the blank line and the repeat skipped
  assert 'top10_gt_aesthetic_original' not in s  # no ground truth outside the world
  groups = preference.open_groups(s['dpo_path'], expect_uv=(2, 2))
  good_ids = {f'img{i:02d}' for i in range(64)}
  assert sorted(groups[i].query for i in range(len(groups))) == sorted(QUERIES)
  for i in range(len(groups)):
    assert set(groups[i].image_ids) <= good_ids, groups[i].image_ids


def test_mined_rows_are_ordered_by_the_original_query_not_its_rephrasing(run):
  """The lexicon rephrasing changes every query here; the rephrased query retrieves the top K,
  and the PT model's similarity to the ORIGINAL query orders them (PAPER.md, step 3). Each
  group's rows must be the stride picks of that order (a row as a set: columns are sorted by
  the aesthetic head), and its semantic and reference scores the original query's."""
  config, workdir = run
  c, u, v = config.mine, config.align.u, config.align.v
  groups = preference.open_groups(_summary(workdir, 'mine')['dpo_path'])
  groups = [groups[i] for i in range(len(groups))]
  emb, ids = retrieval_index.load_index(str(workdir / 'mine' / 'index'), dtype=np.float32)
  keep = ids.astype(str) != 'broken'   # left out of mining (unreadable)
  emb, ids = emb[keep], ids[keep].astype(str)
  position = {image_id: k for k, image_id in enumerate(ids)}
  embedder = embed.Embedder(*context.load_model_folder(str(workdir / 'pretrain' / 'model')))
  q_emb = embedder.texts([g.query for g in groups])
  r_emb = embedder.texts([g.rephrased_query for g in groups])

  def row_sets(order_by, retrieve_by):
    top = np.argsort(-(emb @ retrieve_by))[:c.top_k]
    picks = top[np.argsort(-(emb[top] @ order_by))][:c.stride * u * v:c.stride]
    return [{str(i) for i in ids[row]} for row in picks.reshape(u, v)]

  told_apart = 0
  for g, q, r in zip(groups, q_emb, r_emb):
    assert g.rephrased_query != g.query
    want = row_sets(q, r)
    told_apart += want != row_sets(r, r)
    assert [set(g.image_ids[i * v:(i + 1) * v]) for i in range(u)] == want, g.query
    expected = emb[[position[i] for i in g.image_ids]] @ q
    np.testing.assert_allclose(g.semantic_scores, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.ref_scores, expected, rtol=1e-4, atol=1e-5)
  assert told_apart > 0   # some group's rows would differ if ordered by the rephrasing


def test_aesthetic_scores_are_the_iap_head_on_its_own_clip(run, files):
  """The head reads the 24-wide embeddings of aesthetics.iap.clip_folder (at its 48 px), not
  the 32-wide ones of the model being aligned."""
  config, workdir = run
  group = preference.open_groups(_summary(workdir, 'mine')['dpo_path'])[0]
  source = sources.JsonlSource(files / 'corpus.jsonl', image_size=32)
  by_id = {source[i]['id']: i for i in range(len(source)) if source[i]['valid']}
  images = np.stack([source[by_id[i]]['image'] for i in group.image_ids])
  images = np.stack([images_lib.resize_and_center_crop(im, 48) for im in images])
  iap_cfg, iap_params = hf.load_hf_folder(str(files / 'iap_clip'))
  head, activation = iap.load_params(files / 'iap.safetensors')
  expected = iap.apply(head, embed.Embedder(iap_cfg, iap_params, None).images(images),
                       activation=activation)
  np.testing.assert_allclose(group.aesthetic_scores, np.asarray(expected), rtol=1e-4,
                             atol=1e-6)


def test_align_trains_on_the_mined_groups_with_a_finite_loss(run):
  _, workdir = run
  s = _summary(workdir, 'align')
  assert s['steps'] == 2 and s['groups'] == len(QUERIES) and s['groups_dropped'] == 0
  assert np.isfinite(s['loss']) and np.isfinite(s['dpo_loss'])
  assert (workdir / 'align' / 'model' / hf.WEIGHTS_FILE).exists()


def test_align_finds_the_mined_images_by_id_in_the_corpus(run):
  """At step 1 the policy is the reference, so its rewards are ~0 only if the images align
  fetched by id are the ones mining scored (ref_scores were computed on them)."""
  _, workdir = run
  lines = (workdir / 'align' / 'metrics.jsonl').read_text().splitlines()
  first = json.loads(lines[0])
  assert first['step'] == 1
  assert abs(first['rewards/chosen']) < 1e-5 and abs(first['rewards/rejected']) < 1e-5


def _leaves(tree, prefix=''):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _leaves(v, f'{prefix}{k}/')
    else:
      yield f'{prefix}{k}', np.asarray(v)


def test_queries_file_reads_text_or_json_lines_skipping_bad_and_repeated_lines(tmp_path):
  text = tmp_path / 'q.txt'
  text.write_text('a red square\n\n  a  blue dot \na red square\n')
  assert mining.load_queries(str(text)) == ['a red square', 'a blue dot']
  jsonl = tmp_path / 'q.jsonl'
  jsonl.write_text('{"query": "a red square"}\n{oops\n{"q": "x"}\n{"query": "a blue dot"}\n')
  assert mining.load_queries(str(jsonl)) == ['a red square', 'a blue dot']
  empty = tmp_path / 'empty.txt'
  empty.write_text('\n\n')
  with pytest.raises(ValueError, match=r'config\.mine\.queries_path=.*holds no query'):
    mining.load_queries(str(empty))


def _eval_config(files):
  """_config with the evals of configs/real.py pointed at the files: top-k quality of the
  held-out queries over the corpus, retrieval on the corpus file itself (standing in for
  COCO), the HPIR file; zero-shot ImageNet (a tfds set) stays off."""
  c = _config(files, steps=0)
  c.evals.topk_quality.update(enabled=True, queries_path=str(files / 'eval_queries.jsonl'))
  coco = c.evals.retrieval_coco
  coco.enabled = True
  coco.data.update(path=str(files / 'corpus.jsonl'), root=str(files), image_size=32,
                   worker_count=0, read_threads=2)
  c.evals.hpir.update(enabled=True, path=str(files / 'hpir.jsonl'))
  return c


@pytest.fixture(scope='module')
def evaluated(run, files):
  """The eval stage after `run` (its stages are skipped: the evals are not in their
  fingerprints), as `main.py --mode=eval`."""
  _, workdir = run
  config = _eval_config(files)
  config_checks.validate(config, num_devices=1)   # top-k on the corpus is no longer refused
  shards = sorted((workdir / 'mine' / 'index').glob('*.npz'))
  before = {p: p.stat().st_mtime_ns for p in shards}
  stages.run('eval', config, str(workdir))
  report = json.loads((workdir / 'eval' / 'report.json').read_text())
  return config, workdir, report, {p: p.stat().st_mtime_ns for p in shards} == before


def test_eval_reports_finite_metrics_for_the_three_systems_on_the_corpus(evaluated):
  _, _, report, _ = evaluated
  assert sorted(report['metrics']) == ['PT', 'PT+rephrase', 'aligned']
  for system, m in report['metrics'].items():
    for key in ('topk_quality/aesthetic/iap', 'topk_quality/aesthetic/lowlevel',
                'topk_quality/diversity', 'retrieval_coco/t2i_r1', 'retrieval_coco/t2i_r10',
                'hpir/accuracy', 'hpir/aesthetic'):
      assert key in m, (system, key)
    assert all(np.isfinite(v) for v in m.values()), (system, m)
    assert (m['hpir/items'], m['hpir/items_skipped']) == (2, 1)   # the missing image
    assert m['retrieval_coco/num_images'] == 64                    # the corrupt one skipped
    # No ground truth and no relevance outside the world.
    assert not any('ground_truth' in k or 'precision' in k for k in m), system


def test_eval_top_k_holds_held_out_queries_over_corpus_ids(evaluated):
  config, _, report, _ = evaluated
  good_ids = {f'img{i:02d}' for i in range(64)}
  assert report['corpus']['corpus_indexed'] == 64
  assert report['corpus']['topk_quality_queries_also_mined'] == 1
  for system, top in report['topk'].items():
    assert top['queries'] == EVAL_QUERIES
    assert np.asarray(top['ids']).shape == (len(EVAL_QUERIES), config.evals.topk_quality.k)
    assert {i for row in top['ids'] for i in row} <= good_ids, system
    assert 'relevant' not in top
  assert report['topk']['PT+rephrase']['query_texts'] != EVAL_QUERIES   # rephrased
  assert report['topk']['PT']['query_texts'] == EVAL_QUERIES


def test_eval_reuses_the_mine_index_for_pt_and_embeds_the_corpus_with_the_aligned_model(
    evaluated, files):
  _, workdir, _, mine_index_untouched = evaluated
  assert mine_index_untouched
  pt_emb, pt_ids = retrieval_index.load_index(str(workdir / 'mine' / 'index'))
  al_emb, al_ids = retrieval_index.load_index(str(workdir / 'eval' / 'aligned_index'))
  assert al_ids.astype(str).tolist() == [i for i in pt_ids.astype(str).tolist() if i != 'broken']
  source = sources.JsonlSource(files / 'corpus.jsonl', image_size=32)
  by_id = {source[i]['id']: i for i in range(len(source)) if source[i]['valid']}
  images = np.stack([source[by_id[i]]['image'] for i in al_ids.astype(str)[:8]])
  cfg, params, tok = context.load_model_folder(str(workdir / 'align' / 'model'))
  np.testing.assert_allclose(al_emb[:8], embed.Embedder(cfg, params, tok).images(images),
                             rtol=1e-4, atol=1e-5)
  pt_rows = [pt_ids.astype(str).tolist().index(i) for i in al_ids.astype(str)[:8]]
  assert np.abs(al_emb[:8] - pt_emb[pt_rows]).max() > 1e-4   # not PT's embeddings


def test_eval_judges_by_the_aesthetic_scorer_never_the_world(evaluated):
  _, _, report, _ = evaluated
  assert list(report['judge']) == ['scorer']
  for comparison in ('aligned vs PT', 'aligned vs PT+rephrase'):
    result = report['judge']['scorer'][comparison]
    assert result['num_judged'] == result['num_queries'] == len(EVAL_QUERIES)
    assert list(result['rates']) == ['aesthetic']   # the scorer judge has no accuracy
  findings = {f['metric'] for f in report['findings']}
  assert findings == {'topk_quality/aesthetic/iap', 'hpir/aesthetic', 'retrieval_coco/t2i_r1'}


def test_eval_draws_the_grid_curves_and_trade_off_from_the_corpus(evaluated):
  _, workdir, _, _ = evaluated
  text = (workdir / 'eval' / 'report.md').read_text()
  assert '## Corpus (config.data)' in text and '| scorer | aligned vs PT | aesthetic |' in text
  for name in ('retrieval_grid.png', 'training_curves.png', 'tradeoff.png'):
    assert f'({name})' in text, name
    with Image.open(workdir / 'eval' / name) as png:
      pixels = np.asarray(png.convert('L'), np.float32)
    assert min(pixels.shape) >= 200 and pixels.std() > 10, name   # drawn, not blank


@pytest.mark.parametrize('sets, match', [
    ({'tokenizer.folder': None}, r'config\.tokenizer\.folder is empty'),
    ({'aesthetics.iap.weights': ''}, r'config\.aesthetics\.iap\.weights is empty'),
    ({'evals.topk_quality.enabled': True, 'evals.topk_quality.queries_path': ''},
     r'config\.evals\.topk_quality\.queries_path is empty'),
    ({'evals.retrieval_coco.enabled': True, 'evals.retrieval_coco.source': 'world'},
     r"config\.evals\.retrieval_coco\.source='world': expected 'corpus' or 'data'"),
    ({'evals.hpir.enabled': True, 'evals.hpir.path': '/path/to/hpir.jsonl'},
     r"config\.evals\.hpir\.path='/path/to/hpir\.jsonl': no such file"),
    ({'judge.kind': 'world'}, r"config\.judge\.kind='world'"),
    ({'aesthetics.iap.embed_dim': 768}, r'embed_dim=768 differs from the embedding width 24 '
                                        r'of config\.aesthetics\.iap\.clip_folder'),
    ({'pretrain.steps': 0, 'model.hf_folder': ''}, r'config\.pretrain\.steps=0'),
    ({'pretrain.steps': -1}, r'config\.pretrain\.steps=-1 must be >= 0'),
])
def test_what_the_stages_cannot_do_with_real_data_is_refused_naming_the_key(files, sets, match):
  config = _config(files)
  for dotted, value in sets.items():
    *path, key = dotted.split('.')
    section = config
    for p in path:
      section = section[p]
    section[key] = str(files / value) if value == 'queries.txt' else value
  with pytest.raises(ValueError, match=match):
    config_checks.validate(config, num_devices=1)


def test_top_k_aesthetic_leaves_images_that_did_not_load_out_of_the_mean():
  scores = np.asarray([[1.0, np.nan], [3.0, 4.0]])   # NaN: the scorer could not load it
  m = topk_quality.topk_quality(np.eye(4, dtype=np.float32)[[[0, 1], [2, 3]]], {'iap': scores})
  assert m['aesthetic/iap'] == pytest.approx(8 / 3)


def test_hpir_section_reports_only_the_aspects_the_file_labels(tmp_path):
  """An HPIR file labelling aesthetics only: no NaN accuracy among the metrics; '' = skip."""
  Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / 'a.png')
  Image.fromarray(np.full((40, 30, 3), 20, np.uint8)).save(tmp_path / 'b.png')
  (tmp_path / 'h.jsonl').write_text(json.dumps(
      {'query': 'q', 'group_a': ['a.png'], 'group_b': ['b.png'],
       'labels': {'aesthetic': {'preferred': 'A', 'confidence': 1.0}}}) + '\n')

  class Bright:   # embeds an image by its brightness; cfg.image_size = 16 (so images resize)
    cfg = type('Cfg', (), {'image_size': 16})

    def images(self, images):
      assert images.shape[1:] == (16, 16, 3)
      b = images.mean(axis=(1, 2, 3)) / 255
      return np.stack([b, 1 - b], axis=1).astype(np.float32)

    def texts(self, texts):
      return np.tile(np.asarray([[1.0, 0.0]], np.float32), (len(texts), 1))

  section = hpir.default_config()
  ev = common.make_evaluators(ml_collections.ConfigDict({'hpir': section}))['hpir']
  assert ev.run(common.System('s', Bright())) == {}
  section.path = str(tmp_path / 'h.jsonl')
  assert ev.run(common.System('s', Bright())) == {'aesthetic': 1.0, 'items': 1.0,
                                                   'items_skipped': 0.0}
