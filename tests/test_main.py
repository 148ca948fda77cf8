"""main.py: config overrides, refusals before anything compiles, modes, stage caching."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'),
                         '--config=configs/default.py:smoke', f'--workdir={workdir}', *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.parametrize('override, key', [
    ('--config.pretrain.stepz=5', 'config.pretrain.stepz'),
    ('--config.model.no_such_key=3', 'config.model.no_such_key'),
    ('--config.pretrainz.steps=5', 'config.pretrainz')])
def test_unknown_config_key_is_refused_naming_it(tmp_path, override, key):
  out = _main(override, workdir=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  assert f'error: refused config: {override}: {key} is not a config key' in out.stderr
  assert not os.listdir(tmp_path)   # nothing ran


def test_corpus_with_repeated_ids_is_refused_before_any_stage(tmp_path):
  """A CSV without an id column listing one image twice (its path is the id)."""
  from PIL import Image
  inputs = tmp_path / 'inputs'
  (inputs / 'tokenizer').mkdir(parents=True)
  for name in ('a.png', 'b.png'):
    Image.new('RGB', (40, 40), (9, 9, 9)).save(inputs / name)
  (inputs / 'dup.csv').write_text('image,caption\na.png,one\nb.png,two\na.png,one again\n')
  (inputs / 'dup_config.py').write_text(f"""
from configs import default

def get_config():
  c = default.get_config('smoke')
  c.data.update(source='csv', path={str(inputs / 'dup.csv')!r}, image_size=32)
  c.tokenizer.folder = {str(inputs / 'tokenizer')!r}
  c.aesthetics.kind, c.judge.kind = 'lowlevel', 'scorer'
  for name in ('topk_quality', 'zeroshot_colour', 'zeroshot_shape'):
    del c.evals[name]
  return c
""")
  workdir = tmp_path / 'workdir'
  out = _main(f'--config={inputs / "dup_config.py"}', workdir=workdir)
  assert out.returncode == 2, out.stderr[-2000:]
  assert f"id 'a.png' names 2 records ({inputs / 'dup.csv'}:2, {inputs / 'dup.csv'}:4)" in (
      out.stderr)
  assert not workdir.exists()   # no stage ran


def test_mesh_not_matching_device_count_is_refused_before_compiling(tmp_path):
  out = _main('--config.mesh.data=3', workdir=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'config.mesh' in out.stderr and 'product 3 != 1' in out.stderr
  assert not os.listdir(tmp_path)   # nothing ran


def test_bad_model_shape_is_refused_naming_the_key(tmp_path):
  out = _main('--config.model.overrides.vision_width=130', workdir=tmp_path)
  assert out.returncode == 2
  assert 'config.model.vision_width=130' in out.stderr


def test_unknown_mode_is_refused_naming_it(tmp_path):
  out = _main('--mode=report', workdir=tmp_path)
  assert out.returncode != 0
  assert 'report' in out.stderr and 'mode' in out.stderr


def test_all_mode_runs_every_stage_then_skips_them_on_rerun(smoke_workdir):
  workdir, first = smoke_workdir
  for stage in ('tokenizer', 'pretrain', 'aesthetic', 'mine', 'align', 'eval', 'export'):
    assert os.path.exists(workdir / stage / 'stage.json'), stage
  assert 'step 40/40' in first.stdout and 'step 20/20' in first.stdout
  assert 'mining: 60 queries' in first.stdout
  for stage in ('pretrain', 'align'):   # every checkpoint is said to be on disk
    assert f'checkpoint: step 20 committed in {workdir / stage}' in first.stderr, stage
  second = _main(workdir=workdir)
  assert second.returncode == 0
  for stage in ('tokenizer', 'pretrain', 'mine', 'align', 'eval', 'export'):
    assert f'stage {stage}: done before' in second.stderr, stage
  assert 'step 40/40' not in second.stdout


def test_report_has_every_number_finite_for_the_three_systems(smoke_workdir):
  import json
  from PIL import Image
  workdir, _ = smoke_workdir
  report = json.loads((workdir / 'eval' / 'report.json').read_text())
  assert sorted(report['metrics']) == ['PT', 'PT+rephrase', 'aligned']
  for system, metrics in report['metrics'].items():
    for key in ('retrieval/t2i_r1', 'zeroshot_shape/top1', 'hpir/aesthetic',
                'topk_quality/aesthetic/ground_truth', 'topk_quality/aesthetic/iap'):
      assert np.isfinite(metrics[key]), (system, key)
    assert all(np.isfinite(v) for v in metrics.values()), system
  for comparison in ('aligned vs PT', 'aligned vs PT+rephrase'):
    result = report['judge']['world'][comparison]
    assert result['num_judged'] == result['num_queries'] > 0
    for aspect in ('accuracy', 'aesthetic'):
      rates = result['rates'][aspect]
      assert abs(rates['win'] + rates['similar'] + rates['lose'] - 1) < 1e-9
  # The findings quote the numbers they compare, and IAP vs low-level is among them.
  findings = {f['finding']: f for f in report['findings']}
  assert len(findings) == 8
  # Headline numbers and verdicts, recomputed from the top-k ids the report records and the
  # world's ground truth (tests/test_report_degraded.py).
  from configs import default
  from input_pipeline import world as world_lib
  from test_report_degraded import check_report_against_world
  check_report_against_world(report, world_lib.World(default.get_config('smoke').world))
  iap = next(f for text, f in findings.items() if 'IAP' in text)
  assert iap['values']['IAP'] == report['stages']['aesthetic']['iap_spearman_vs_truth']
  assert all(np.isfinite(v) for f in findings.values() for v in f['values'].values())
  text = (workdir / 'eval' / 'report.md').read_text()
  for piece in ('| hpir/aesthetic |', '## Findings', 'IAP predictor', '## Config',
                '"num_eval_queries"', '| world | aligned vs PT | aesthetic |'):
    assert piece in text, piece
  for name in ('retrieval_grid.png', 'training_curves.png', 'tradeoff.png'):
    assert f'({name})' in text
    with Image.open(workdir / 'eval' / name) as png:
      pixels = np.asarray(png.convert('L'), np.float32)
    assert min(pixels.shape) >= 300 and pixels.std() > 10, name   # drawn, not blank


def test_eval_with_the_openai_judge_counts_refusals_and_malformed_answers(
    smoke_workdir, tmp_path, monkeypatch):
  """The eval stage's openai judge against a loopback LMM: every 5th call is refused, every
  7th is malformed; those queries are excluded and counted, the rest parsed, nothing crashes."""
  import http.server
  import itertools
  import json
  import threading
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from aesalign_jax import sharding, stages
  from aesalign_jax.evaluation import report as report_lib
  from aesalign_jax.stages import cache, context, evaluate
  from configs import default
  from loopback import chat_answer, send_json, serving

  counter, lock = itertools.count(1), threading.Lock()

  class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
      pass

    def do_POST(self):
      body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
      assert sum(p['type'] == 'image_url' for p in body['messages'][-1]['content']) > 0
      with lock:
        n = next(counter)
      if n % 5 == 0:
        text = "I'm sorry, I can't compare these images."
      elif n % 7 == 0:
        text = '{"accuracy": "A", "aesthetic": "perhaps"}'
      else:
        text = '{"accuracy": "A", "aesthetic": "B"}'
      send_json(self, 200, chat_answer(text))

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  server.daemon_threads = True
  workdir, _ = smoke_workdir
  config = default.get_config('smoke')
  config.judge.update(kind='openai', base_url=f'http://127.0.0.1:{server.server_address[1]}/v1',
                      model='loopback-vision', api_key_env='AESALIGN_TEST_EVAL_KEY',
                      timeout_s=10.0, max_concurrency=4, max_images_per_group=3)
  with serving(server, monkeypatch, 'AESALIGN_TEST_EVAL_KEY', 'sk-eval-secret'):
    ctx = stages.Context(config, str(workdir), sharding.make_mesh(config.mesh))
    pt = context.load_model_folder(str(workdir / 'pretrain' / 'model'))
    aligned = context.load_model_folder(str(workdir / 'align' / 'model'))
    data = evaluate.eval_corpus(ctx, str(tmp_path), pt, aligned,
                                str(workdir / 'aesthetic' / 'iap.safetensors'))
    report = report_lib.evaluate(config, pt, aligned, data, str(tmp_path),
                                 cache.stage_summaries(str(workdir), evaluate.REPORTED_STAGES))
  for comparison, result in report['judge']['openai'].items():
    assert 0 < result['failures'] < result['num_queries'], comparison
    assert result['num_judged'] + result['failures'] == result['num_queries']
    # Always "A" for accuracy and "B" for aesthetic: with the order swapped, "similar".
    for aspect in ('accuracy', 'aesthetic'):
      assert result['rates'][aspect]['similar'] == 1.0
  assert report['judge']['world']['aligned vs PT']['failures'] == 0
  assert 'sk-eval-secret' not in (tmp_path / 'report.json').read_text()
  assert '| openai | aligned vs PT | aesthetic |' in (tmp_path / 'report.md').read_text()


def test_align_and_export_modes_write_a_model_transformers_loads(smoke_workdir, tmp_path):
  import shutil
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from aesalign_jax import embed
  from aesalign_jax.models import hf
  from aesalign_jax.tokenizer import ClipTokenizer
  from configs import default
  from input_pipeline import preference, world as world_lib, world_groups
  workdir, _ = smoke_workdir
  model_dir = str(workdir / 'pretrain' / 'model')
  cfg, params = hf.load_hf_folder(model_dir)
  embedder = embed.Embedder(cfg, params, ClipTokenizer.from_folder(model_dir))
  world = world_lib.World(default.get_config('smoke').world)
  lookup = preference.world_image_lookup(world)
  groups = world_groups.world_groups(
      world, world.mining_queries[:40], u=5, v=5, rng=0,
      ref_score_fn=lambda texts, ids: embedder.group_scores(
          texts, np.stack([lookup(list(r)) for r in ids])))
  dpo = str(tmp_path / 'dpo.arrayrecord')
  preference.write_groups(dpo, groups)
  workdir = tmp_path / 'run'   # a copy: the other tests read the smoke run as it was
  shutil.copytree(smoke_workdir[0], workdir)
  out = _main('--mode=export', f'--config.align.dpo_path={dpo}', workdir=workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'step 20/20' in out.stdout and 'rewards/accuracies' in out.stdout
  export = workdir / 'export'
  aligned_cfg, aligned = hf.load_hf_folder(str(export / 'hf'))
  assert aligned_cfg == cfg
  assert not np.array_equal(aligned['logit_scale'], params['logit_scale']) or any(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(aligned), jax.tree.leaves(params)))
  from aesalign_jax import checkpointing
  restored = checkpointing.load_params(str(export / 'params'))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(aligned)):
    np.testing.assert_array_equal(a, b)
  # Parity with transformers needs torch (the ".[test]" extra pins a CPU build): without it
  # the checks above still ran, and this part is skipped.
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model = transformers.CLIPModel.from_pretrained(str(export / 'hf')).eval()
  ids = torch.tensor(ClipTokenizer.from_folder(str(export / 'hf'))(['a red circle'])['ids'],
                     dtype=torch.long)
  with torch.no_grad():
    theirs = model.get_text_features(input_ids=ids)
  ours = embed.Embedder(aligned_cfg, aligned, ClipTokenizer.from_folder(str(export / 'hf')))
  theirs = theirs.pooler_output if hasattr(theirs, 'pooler_output') else theirs
  theirs = theirs.numpy() / np.linalg.norm(theirs.numpy(), axis=-1, keepdims=True)
  np.testing.assert_allclose(ours.texts(['a red circle']), theirs, atol=1e-4)


def test_align_with_missing_dpo_file_is_refused_naming_the_key(tmp_path):
  out = _main('--mode=align', '--config.align.dpo_path=/no/such/dpo.arrayrecord',
              workdir=tmp_path)
  assert out.returncode == 2
  assert 'config.align.dpo_path' in out.stderr


def test_faiss_backend_mines_the_same_dpo_and_retrieves_the_same_top_k(smoke_workdir, tmp_path):
  """--config.retrieval.backend=faiss (flat_ip, exact) redoes mine and eval on a copy of the
  smoke run: the D_po file is byte-identical (so align is skipped: its input did not change)
  and every system's top-k rows equal the device backend's."""
  import json
  import shutil
  pytest.importorskip('faiss')
  workdir, _ = smoke_workdir
  copy = tmp_path / 'faiss'
  shutil.copytree(workdir, copy)   # keeps mtimes: the copied stages are done
  for stage in ('mine', 'eval'):
    shutil.rmtree(copy / stage)
  out = _main('--mode=eval', '--config.retrieval.backend=faiss', workdir=copy)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'stage mine: started' in out.stderr and 'stage align: done before' in out.stderr
  assert 'FAISS flat_ip index over 2048 rows' in out.stderr   # mining's corpus, by faiss
  assert 'FAISS flat_ip index over 512 rows' in out.stderr    # the held-out images, by faiss
  assert (copy / 'mine' / 'dpo.arrayrecord').read_bytes() == (
      workdir / 'mine' / 'dpo.arrayrecord').read_bytes()
  device, faiss = (json.loads((w / 'eval' / 'report.json').read_text()) for w in (workdir, copy))
  assert faiss['config']['retrieval']['backend'] == 'faiss'
  for system in ('PT', 'PT+rephrase', 'aligned'):
    assert faiss['topk'][system]['ids'] == device['topk'][system]['ids'], system
  assert faiss['metrics'] == device['metrics']
