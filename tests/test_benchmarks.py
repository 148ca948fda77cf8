"""The benchmark suite runs end to end at a tiny size and writes a complete results table.

Timings at this size mean nothing; what must hold is that every row is measured (finite,
positive) or says why it was skipped, that the files are written, and that the comparisons
compare the same function (open_clip's loss equals ours at the same weights).
"""

import json
import math

import pytest

from aesalign_jax.models import clip

from benchmarks import gpu_step, run_all   # from the checkout (pytest's pythonpath)


@pytest.fixture(scope='module')
def quick_results(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'results.json'
  assert run_all.main(['--quick', '--out', str(out)]) == 0   # 1: some row errored
  with open(out, encoding='utf-8') as f:
    return json.load(f), out


def test_quick_run_writes_every_row_measured_or_skipped(quick_results):
  result, _ = quick_results
  names = [r['name'] for r in result['rows']]
  assert len(names) == len(set(names))
  for prefix in run_all.ORDER:   # every benchmark of the suite has its row
    assert any(n.startswith(prefix) for n in names), prefix
  for r in result['rows']:
    if r['status'] != 'ok':
      assert r['status'].startswith('skipped: '), (r['name'], r['status'])
      continue
    for side in ('a', 'b'):
      assert math.isfinite(r[side]['value']) and r[side]['value'] > 0, r
      assert r[side]['unit'] and r[side]['label']
    assert math.isfinite(r['ratio']) and r['ratio'] > 0, r
    assert r['ratio_is'] and r['compared'] and isinstance(r['settings'], dict)
    assert r['machine']['cpu_count'] >= 1 and r['machine']['jax'] and r['machine']['backend']
    if 'target' in r:
      assert r['meets_target'] == (r['ratio'] >= float(r['target'].split()[-1]))


def test_quick_run_writes_the_markdown_table_beside_the_json(quick_results):
  result, out = quick_results
  md = out.with_suffix('.md').read_text(encoding='utf-8')
  assert md == run_all.markdown(result)
  table = [line for line in md.splitlines() if line.startswith('| ')]
  assert len(table) == 2 + len(result['rows'])   # header, rule, one line per row
  for r in result['rows']:
    assert f"| {r['name']} |" in md


def test_ratios_are_the_quotients_of_their_measurements(quick_results):
  rows = {r['name']: r for r in quick_results[0]['rows'] if r['status'] == 'ok'}
  dpo = rows['dpo_listwise_vs_pairwise']
  assert dpo['ratio'] == pytest.approx(dpo['a']['value'] / dpo['b']['value'], rel=1e-6)
  pipe = rows['pairs_pipeline_vs_pretrain_step']
  assert pipe['ratio'] == pytest.approx(pipe['a']['value'] / pipe['b']['value'], rel=1e-6)
  for r in rows.values():
    if r['ratio_is'].startswith('MFU'):
      assert r['ratio'] == pytest.approx(r['a']['value'] / r['b']['value'], rel=1e-6)
    if '(> 1: ours faster)' in r['ratio_is']:   # theirs s / ours s
      assert r['ratio'] == pytest.approx(r['b']['value'] / r['a']['value'], rel=1e-6)


def test_open_clip_step_computes_our_loss_at_the_same_weights(quick_results):
  rows = {r['name']: r for r in quick_results[0]['rows']}
  r = rows['train_step_vs_open_clip']
  if r['status'] != 'ok':
    pytest.skip(r['status'])
  d = r['details']
  assert d['loss_ours'] == pytest.approx(d['loss_open_clip'], rel=1e-5)
  assert d['loss_ours'] == pytest.approx(math.log(8), rel=0.2)   # random init: near log(B)


def test_open_clip_shapes_of_vit_b32_are_its_named_config():
  from benchmarks import open_clip_speed
  try:
    open_clip = open_clip_speed.import_open_clip()
  except ImportError as e:
    pytest.skip(str(e))
  assert (open_clip_speed.open_clip_config(clip.preset('vit_b32'))
          == open_clip_speed.named_config(open_clip, 'ViT-B-32'))


def test_gpu_step_runs_at_a_tiny_size_on_cpu():
  cfg = clip.preset('tiny', vision_layers=1, text_layers=1)
  r = gpu_step.run(cfg, [8, 4], steps=1, kinds=('align',))   # align: pairs and groups
  assert r['backend'] and r['matmul_peak_tflops'] > 0
  assert r['align']['batch'] == 8                  # the largest batch fits on the host
  assert r['align']['groups'] == 1
  assert math.isfinite(r['align']['loss']) and 0 < r['align']['mfu'] < 2
  assert 'pretrain' not in r and 'dpo_listwise_vs_pairwise' not in r   # only the kinds asked
