"""Report figures: each is written as a PNG that decodes, has the expected size and shows what it
should; bad inputs are refused with a ValueError naming what is missing."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from aesalign_jax.evaluation import figures, topk_quality
from input_pipeline import world as world_lib

SYSTEMS = ('PT', 'PT+rephrase', 'aligned')


def _rgb(hex_colour):
  return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def _load(path):
  """The PNG as uint8 [H, W, 3], after checking it is a non-blank image."""
  assert os.path.exists(path), path
  with Image.open(path) as im:
    assert im.format == 'PNG'
    pixels = np.asarray(im.convert('RGB'))
  assert pixels.std() > 0, f'{path} is blank'
  return pixels


def _count(pixels, hex_colour, tol=12):
  """Pixels within `tol` grey levels of a colour in every channel."""
  return int(np.all(np.abs(pixels.astype(int) - _rgb(hex_colour)) <= tol, axis=-1).sum())


def _contains_block(pixels, block):
  """Whether `block` [h, w, 3] appears somewhere in `pixels` (checked where its corner does)."""
  h, w = block.shape[:2]
  ys, xs = np.nonzero(np.all(pixels == block[0, 0], axis=-1))
  return any(np.array_equal(pixels[y:y + h, x:x + w], block) for y, x in zip(ys, xs))


def _images(q, k, seed):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8) for _ in range(q)]


def _grid_data(q=2, k=5):
  images = {s: _images(q, k, j) for j, s in enumerate(SYSTEMS)}
  captions = {s: [[f'gt 0.{j}{i} ✓\niap 0.5{i}' for i in range(k)] for j in range(q)]
              for s in SYSTEMS}
  relevant = {s: [[i % 2 == 0 for i in range(k)] for _ in range(q)] for s in SYSTEMS}
  notes = {s: [f'top {k}: mean gt 0.5' + ('\nsearched: “… sharp, well framed”'
                                          if s == 'PT+rephrase' else '')] * q for s in SYSTEMS}
  return [f'query {j}' for j in range(q)], images, captions, relevant, notes


# --- retrieval grid ----------------------------------------------------------------------------

def test_retrieval_grid_draws_every_image_upscaled_with_relevance_frames(tmp_path):
  queries, images, captions, relevant, notes = _grid_data(q=2, k=5)
  path = figures.retrieval_grid(str(tmp_path / 'sub' / 'grid.png'), queries, images, captions,
                                relevant=relevant, notes=notes, image_px=96, dpi=100)
  pixels = _load(path)
  h, w, _ = pixels.shape
  # Label column 2.1 in + 5 images of 96 px + gaps + margins, at 100 dpi.
  assert w == pytest.approx(100 * (0.3 + 2.1) + 5 * 96 + 4 * 8, abs=2)
  assert h > 2 * 3 * 96                         # 2 queries x 3 systems of 96-px rows
  # Each image is upscaled 3x nearest-neighbour: some 3x3 block of the page equals pixel
  # (10, 10) of the first image of the first row blown up (search around its expected place).
  target = images['PT'][0][0, 10:12, 10:12].repeat(3, 0).repeat(3, 1)
  assert _contains_block(pixels, target)
  # Relevant images get a green frame, the others a red one: both colours are drawn.
  # (Exact colours: random image pixels hardly ever hit one.)
  assert _count(pixels, figures.ON_TOPIC, tol=1) > 1000
  assert _count(pixels, figures.OFF_TOPIC, tol=1) > 1000


def test_retrieval_grid_without_relevance_draws_no_coloured_frames(tmp_path):
  queries, images, captions, _, _ = _grid_data(q=1, k=3)
  images = {s: [np.full((3, 32, 32, 3), 128, np.uint8)] for s in SYSTEMS}
  pixels = _load(figures.retrieval_grid(str(tmp_path / 'g.png'), queries, images,
                                        {s: [c[0][:3]] for s, c in captions.items()}))
  assert _count(pixels, figures.ON_TOPIC, tol=4) == 0


def test_retrieval_grid_names_the_system_with_missing_rows(tmp_path):
  queries, images, captions, _, _ = _grid_data(q=2, k=5)
  images['aligned'] = images['aligned'][:1]
  with pytest.raises(ValueError, match=r"images\['aligned'\] has 1 rows for 2 queries"):
    figures.retrieval_grid(str(tmp_path / 'g.png'), queries, images, captions)
  assert not (tmp_path / 'g.png').exists()


def test_retrieval_grid_names_the_system_without_captions(tmp_path):
  queries, images, captions, _, _ = _grid_data(q=2, k=5)
  del captions['PT+rephrase']
  with pytest.raises(ValueError, match=r"captions has no entry for system\(s\) \['PT\+rephrase'\]"):
    figures.retrieval_grid(str(tmp_path / 'g.png'), queries, images, captions)


def test_retrieval_grid_names_the_query_whose_captions_do_not_match_its_images(tmp_path):
  queries, images, captions, _, _ = _grid_data(q=2, k=5)
  captions['aligned'][1] = captions['aligned'][1][:4]
  with pytest.raises(ValueError, match=r"system 'aligned', query 1 \('query 1'\).*4 entries "
                                       r"for 5 images"):
    figures.retrieval_grid(str(tmp_path / 'g.png'), queries, images, captions)


def test_retrieval_grid_refuses_images_that_are_not_uint8_rgb(tmp_path):
  queries, images, captions, _, _ = _grid_data(q=1, k=2)
  images['PT'] = [np.zeros((2, 32, 32), np.uint8)]
  with pytest.raises(ValueError, match=r"system 'PT', query 0.*uint8 \[K, H, W, 3\]"):
    figures.retrieval_grid(str(tmp_path / 'g.png'), queries, images, captions)


def _topk_json(queries, rows, *, rephrase=None, system='PT', n=40):
  """TopK.to_json of a fake system: corpus rows given, ids = 1000 + row, gt = row / n."""
  rows = np.asarray(rows, np.int64)
  texts = [q + rephrase if rephrase else q for q in queries]
  top = topk_quality.TopK(system=system, queries=list(queries), query_texts=texts, rows=rows,
                          similarity=np.zeros(rows.shape, np.float32), ids=rows + 1000,
                          aesthetic={'ground_truth': rows / n, 'iap': 1 - rows / n},
                          relevant=rows % 2 == 0)
  return top.to_json()


def _topk_report(q=3, k=8):
  queries = [f'a red cross {j}' for j in range(q)]
  rng = np.random.default_rng(0)
  return {s: _topk_json(queries, rng.choice(40, (q, k), replace=False).reshape(q, k)
                        if q * k <= 40 else rng.integers(0, 40, (q, k)),
                        rephrase=', sharp, well framed' if s == 'PT+rephrase' else None,
                        system=s) for s in SYSTEMS}


def _id_images(ids):
  """Images that encode their id: every pixel (id % 256, id // 256, 7)."""
  ids = np.asarray(ids)
  out = np.zeros((len(ids), 32, 32, 3), np.uint8)
  out[..., 0] = (ids % 256)[:, None, None]
  out[..., 1] = (ids // 256)[:, None, None]
  out[..., 2] = 7
  return out


def test_grid_inputs_turns_report_topk_into_grid_rows_captions_and_notes(tmp_path):
  topk = _topk_report(q=3, k=8)
  inputs = figures.grid_inputs(topk, _id_images, query_indices=[2, 0], k=5)
  assert inputs['queries'] == ['a red cross 2', 'a red cross 0']
  for s in SYSTEMS:
    ids = np.asarray(topk[s]['ids'])
    np.testing.assert_array_equal(np.stack(inputs['images'][s]),
                                  _id_images(ids[[2, 0], :5].reshape(-1)).reshape(2, 5, 32, 32, 3))
    row = np.asarray(topk[s]['rows'])[2, :5]
    first = inputs['captions'][s][0][0]
    mark = '✓' if row[0] % 2 == 0 else '✗'
    assert first == f'gt {row[0] / 40:.2f} {mark}\niap {1 - row[0] / 40:.2f}'
    assert inputs['relevant'][s][0] == [bool(r % 2 == 0) for r in row]
    assert f'mean gt {np.mean(row / 40):.3f}' in inputs['notes'][s][0]
    assert f'{int(np.sum(row % 2 == 0))}/5 on-topic' in inputs['notes'][s][0]
  # Only the rephrasing system searched with other words; its note shows the added words.
  assert 'searched: “… sharp, well framed”' in inputs['notes']['PT+rephrase'][0]
  assert 'searched' not in inputs['notes']['PT'][0]
  assert 'gt = ' in inputs['subtitle'] and 'iap = ' in inputs['subtitle']
  _load(figures.retrieval_grid(str(tmp_path / 'g.png'), **inputs))


def test_grid_inputs_names_a_system_without_ids_and_a_query_out_of_range():
  topk = _topk_report()
  del topk['aligned']['ids']
  with pytest.raises(ValueError, match=r"topk\['aligned'\] has no 'ids'"):
    figures.grid_inputs(topk, _id_images, query_indices=[0])
  with pytest.raises(ValueError, match=r'query indices \[7\] out of range \[0, 3\)'):
    figures.grid_inputs(_topk_report(), _id_images, query_indices=[0, 7])


# --- training curves ---------------------------------------------------------------------------

def _write_jsonl(path, records, torn_tail=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
    if torn_tail:
      f.write('{"step": 999, "loss": 1.')
  return path


def _pretrain_records(n=10):
  return [{'step': 1 + 50 * i, 'contrastive_loss': 5.0 - 0.3 * i, 'loss': 5.0 - 0.3 * i,
           'contrastive/t2i_accuracy': 0.05 * i, 'contrastive/i2t_accuracy': 0.06 * i}
          for i in range(n)]


def _align_records(n=8):
  return [{'step': 1 + 25 * i, 'contrastive_loss': 1.45 - 0.01 * i, 'dpo_loss': 0.693 - 0.002 * i,
           'loss': 2.14 - 0.012 * i, 'rewards/accuracies': 0.4 + 0.04 * i,
           'rewards/margins': 0.003 * i, 'rewards/chosen': -0.002 * i,
           'rewards/rejected': -0.005 * i} for i in range(n)]


def test_training_curves_draws_seven_panels_from_both_stages(tmp_path):
  pre = _write_jsonl(str(tmp_path / 'pretrain' / 'metrics.jsonl'), _pretrain_records())
  align = _write_jsonl(str(tmp_path / 'align' / 'metrics.jsonl'), _align_records(),
                       torn_tail=True)
  pixels = _load(figures.training_curves(str(tmp_path / 'curves.png'), pre, align, dpi=100))
  assert pixels.shape[:2] == (2 * 270, 4 * 340)          # 2 x 4 panels of 3.4 x 2.7 in
  # Pretrain curves in PT's colour, align curves in aligned's colour.
  assert _count(pixels, figures.SYSTEM_COLOURS['PT'], tol=8) > 100
  assert _count(pixels, figures.SYSTEM_COLOURS['aligned'], tol=8) > 300


def test_training_curves_with_only_the_align_stage(tmp_path):
  align = _write_jsonl(str(tmp_path / 'a.jsonl'), _align_records())
  pixels = _load(figures.training_curves(str(tmp_path / 'curves.png'), None, align, dpi=100))
  assert pixels.shape[:2] == (2 * 270, 3 * 340)          # 5 align panels: 2 rows of 3
  assert _count(pixels, figures.SYSTEM_COLOURS['PT'], tol=8) == 0


def test_training_curves_names_an_empty_or_missing_metrics_file(tmp_path):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  align = _write_jsonl(str(tmp_path / 'a.jsonl'), _align_records())
  with pytest.raises(ValueError, match=f'{empty}.*no records'):
    figures.training_curves(str(tmp_path / 'c.png'), str(empty), align)
  with pytest.raises(ValueError, match='nope.jsonl does not exist'):
    figures.training_curves(str(tmp_path / 'c.png'), str(tmp_path / 'nope.jsonl'), align)
  with pytest.raises(ValueError, match='neither pretrain_jsonl nor align_jsonl'):
    figures.training_curves(str(tmp_path / 'c.png'))
  assert not (tmp_path / 'c.png').exists()


def test_training_curves_names_the_keys_a_metrics_file_lacks(tmp_path):
  odd = _write_jsonl(str(tmp_path / 'odd.jsonl'), [{'step': 1, 'eval/recall': 0.2}])
  with pytest.raises(ValueError,
                     match=r"odd.jsonl has none of the keys \['contrastive_loss', 'dpo_loss'"):
    figures.training_curves(str(tmp_path / 'c.png'), None, odd)


def test_read_metrics_jsonl_skips_a_torn_last_line(tmp_path):
  path = _write_jsonl(str(tmp_path / 'm.jsonl'), _align_records(3), torn_tail=True)
  records = figures.read_metrics_jsonl(path)
  assert [r['step'] for r in records] == [1, 26, 51]


# --- trade-off ---------------------------------------------------------------------------------

POINTS = {'PT': (0.424, 0.521), 'PT+rephrase': (0.424, 0.523), 'aligned': (0.420, 0.553)}


def test_tradeoff_draws_each_system_in_its_colour_with_extra_points(tmp_path):
  pixels = _load(figures.tradeoff(str(tmp_path / 't.png'), POINTS, baseline='PT',
                                  extra_points={'λ=0.5': (0.41, 0.57), 'λ=2': (0.425, 0.53)}))
  assert pixels.shape[:2] == (480, 640)
  for s in SYSTEMS:
    assert _count(pixels, figures.SYSTEM_COLOURS[s], tol=8) > 30, s


def test_tradeoff_names_a_bad_point_and_an_unknown_baseline(tmp_path):
  with pytest.raises(ValueError, match=r"point 'aligned' must be two finite numbers"):
    figures.tradeoff(str(tmp_path / 't.png'), {**POINTS, 'aligned': (float('nan'), 0.5)})
  with pytest.raises(ValueError, match=r"baseline 'CLIP' is not among the points"):
    figures.tradeoff(str(tmp_path / 't.png'), POINTS, baseline='CLIP')
  with pytest.raises(ValueError, match='no points'):
    figures.tradeoff(str(tmp_path / 't.png'), {})


def test_tradeoff_points_reads_report_metrics_and_names_a_missing_key():
  metrics = {s: {'retrieval/t2i_r10': x, 'topk_quality/aesthetic/ground_truth': y}
             for s, (x, y) in POINTS.items()}
  assert figures.tradeoff_points(metrics) == POINTS
  del metrics['aligned']['retrieval/t2i_r10']
  with pytest.raises(ValueError, match=r"metrics\['aligned'\] lacks \['retrieval/t2i_r10'\]"):
    figures.tradeoff_points(metrics)


# --- everything from a report ------------------------------------------------------------------

def _report(topk):
  metrics = {s: {'retrieval/t2i_r10': x, 'topk_quality/aesthetic/ground_truth': y}
             for s, (x, y) in POINTS.items()}
  return {'metrics': metrics, 'topk': topk, 'config': {'evals': {'topk_quality': {'k': 8}}}}


def test_write_report_figures_renders_the_world_ids_and_reads_the_stage_metrics(tmp_path):
  world = world_lib.World(num_train=1000, num_eval=40, num_hpir_pool=0)
  topk = _topk_report(q=3, k=8)
  for t in topk.values():            # corpus = the eval split, as in report.evaluate
    t['ids'] = (np.asarray(t['rows']) + world.split_range('eval')[0]).tolist()
  _write_jsonl(str(tmp_path / 'pretrain' / 'metrics.jsonl'), _pretrain_records())
  _write_jsonl(str(tmp_path / 'align' / 'metrics.jsonl'), _align_records())
  out = str(tmp_path / 'eval')
  paths = figures.write_report_figures(out, _report(topk), world=world, num_queries=2, k=4)
  assert paths == [os.path.join(out, f) for f in ('retrieval_grid.png', 'training_curves.png',
                                                  'tradeoff.png')]
  grid = _load(paths[0])
  # The first shown image is the world's rendering of PT's first id, upscaled 3x.
  first = world.render_batch([topk['PT']['ids'][0][0]])[0]
  target = first[10:12, 10:12].repeat(3, 0).repeat(3, 1)
  assert _contains_block(grid, target)
  for p in paths[1:]:
    _load(p)


def test_write_report_figures_skips_what_it_has_no_data_for(tmp_path):
  # No image source, no stage metrics: only the trade-off plot.
  paths = figures.write_report_figures(str(tmp_path / 'eval'), _report(_topk_report()))
  assert paths == [str(tmp_path / 'eval' / 'tradeoff.png')]
  # A corpus loader instead of a world reads the topk rows, not the ids.
  paths = figures.write_report_figures(str(tmp_path / 'eval'), _report(_topk_report()),
                                       corpus_images=_id_images, num_queries=1, k=2)
  assert paths[0] == str(tmp_path / 'eval' / 'retrieval_grid.png')
