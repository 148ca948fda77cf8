"""The report with the LLM endpoint down (issue 13): the mine and eval stages run against a
loopback endpoint that answers 500 to everything; report.json counts every rephrasing that
fell back and every judge call that failed, per stage, and report.md says so near the top and
marks the numbers resting on them. Also: the report's headline numbers and verdicts agree
with the world's ground truth, recomputed from the top-k ids report.json records.

Small random-weight models on a small world keep this quick: what is checked is the
accounting, not the models' quality."""

import http.server
import json
import threading

import numpy as np
import pytest
from absl import flags

from loopback import send_json, serving

KEY_ENV = 'AESALIGN_TEST_DOWN_KEY'
TOPK = 'topk_quality'


class DownLLM(http.server.ThreadingHTTPServer):
  """An OpenAI-compatible endpoint that is down: 500 to every request, counted."""
  daemon_threads = True

  def __init__(self):
    super().__init__(('127.0.0.1', 0), _Down)
    self.requests, self.lock = 0, threading.Lock()

  @property
  def base_url(self):
    return f'http://127.0.0.1:{self.server_address[1]}/v1'


class _Down(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):
    pass

  def do_POST(self):
    self.rfile.read(int(self.headers['Content-Length']))
    with self.server.lock:
      self.server.requests += 1
    send_json(self, 500, b'{"error": "the model is not loaded"}')


def _config():
  from configs import default
  config = default.get_config('smoke')
  config.world.update(num_train=256, num_eval=256, num_hpir_pool=2000, num_queries=48,
                      num_eval_queries=24)
  config.hpir_world.num_queries = 4
  config.mine.update(corpus_size=256, max_queries=6, top_k=100)
  config.aesthetics.kind = 'lowlevel'
  return config


def _openai(config, url):
  """Both LLM users of the run pointed at `url`, one request per call (no retries)."""
  config.rephrase.update(backend='openai', base_url=url, model='down-chat', api_key_env=KEY_ENV,
                         max_retries=0, timeout_s=5.0)
  config.judge.update(kind='openai', base_url=url, model='down-vision', api_key_env=KEY_ENV,
                      max_retries=0, timeout_s=5.0, max_images_per_group=2)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """PT and 'aligned': two random-weight 1-layer CLIPs saved as model folders."""
  from aesalign_jax import tokenizer
  from aesalign_jax.models import clip, hf
  from input_pipeline import world as world_lib
  flags.FLAGS.mark_as_parsed()
  root = tmp_path_factory.mktemp('models')
  world = world_lib.World(_config().world)
  tok = tokenizer.train_bpe(world.captions(np.arange(512)), vocab_size=300,
                            folder=str(root / 'tok'), context_length=24)
  cfg = clip.preset('tiny', vision_layers=1, text_layers=1, vocab_size=300,
                    context_length=24, eos_token_id=tok.eos_token_id)
  folders = {}
  for seed, name in enumerate(('pt', 'aligned')):
    folders[name] = str(root / name)
    hf.save_hf_folder(cfg, clip.init_params(cfg, seed), folders[name])
    tok.save(folders[name])
  return folders


def _run(config, workdir, models):
  """The mine stage, then the evaluation (as the eval stage runs it); the report dict."""
  from aesalign_jax import retrieval, sharding, stages
  from aesalign_jax.evaluation import report as report_lib
  from aesalign_jax.stages import cache, context, evaluate
  from aesalign_jax.stages import mine as mine_stage
  ctx = stages.Context(config, str(workdir), sharding.make_mesh(config.mesh))
  mine_stage.run(ctx, {'pretrain': models['pt'], 'aesthetic': None})
  pt = context.load_model_folder(models['pt'], config.model)
  aligned = context.load_model_folder(models['aligned'], config.model)
  out = str(workdir / 'eval')
  data = evaluate.eval_corpus(ctx, out, pt, aligned, None)
  return report_lib.evaluate(config, pt, aligned, data, out,
                             cache.stage_summaries(str(workdir), evaluate.REPORTED_STAGES),
                             searcher=retrieval.make_searcher(config.retrieval, ctx.mesh))


@pytest.fixture(scope='module')
def down(models, tmp_path_factory):
  """(report.json, report.md, requests the endpoint got, config) of a run whose LLM is down."""
  workdir = tmp_path_factory.mktemp('down')
  config = _config()
  with pytest.MonkeyPatch.context() as monkeypatch:
    with serving(DownLLM(), monkeypatch, KEY_ENV, 'sk-down') as server:
      _openai(config, server.base_url)
      _run(config, workdir, models)
      requests = server.requests
  return (json.loads((workdir / 'eval' / 'report.json').read_text()),
          (workdir / 'eval' / 'report.md').read_text(), requests, config)


@pytest.fixture(scope='module')
def healthy(models, tmp_path_factory):
  """(report.json, report.md) of the same run with the offline lexicon and the world judge."""
  workdir = tmp_path_factory.mktemp('healthy')
  _run(_config(), workdir, models)
  return (json.loads((workdir / 'eval' / 'report.json').read_text()),
          (workdir / 'eval' / 'report.md').read_text())


def test_report_json_counts_every_rephrasing_that_fell_back_per_stage(down):
  report, _, _, config = down
  fallbacks = report['fallbacks']
  mine = fallbacks['mine']['rephrase']
  assert (mine['queries'], mine['fallbacks'], mine['rate']) == (6, 6, 1.0)
  assert mine['backend'] == 'openai' and 'HTTP 500' in mine['first_fallback']['reason']
  assert report['stages']['mine']['rephrase']['rate'] == 1.0
  sections = fallbacks['eval']['rephrase']['sections']
  num_eval = config.world.num_eval_queries
  assert sections[TOPK]['queries'] == sections[TOPK]['fallbacks'] == num_eval
  assert sections[TOPK]['rate'] == 1.0 and sections[TOPK]['backend_calls'] == num_eval
  hpir = sections['hpir']
  assert hpir['fallbacks'] == hpir['queries'] > 0
  total = fallbacks['eval']['rephrase']
  assert total['fallbacks'] == total['queries'] == num_eval + hpir['queries']
  assert total['rate'] == 1.0 and total['from_cache'] == 0
  # PT + rephrase searched with the plain queries: its top-k numbers are PT's, and marked.
  for key, value in report['metrics']['PT'].items():
    if key.startswith((f'{TOPK}/', 'hpir/')):
      assert report['metrics']['PT+rephrase'][key] == value, key
      assert report['degraded']['metrics']['PT+rephrase'][key] == ['rephrase']
  assert not any(k.startswith('retrieval/')
                 for k in report['degraded']['metrics']['PT+rephrase'])
  assert report['degraded']['stages'] == {'mine': ['rephrase'], 'eval': ['rephrase', 'judge']}
  assert report['degraded']['stage_numbers']['mine'] == {
      'top10_gt_aesthetic_rephrased': ['rephrase'], 'top10_relevance_rephrased': ['rephrase']}


def test_report_json_counts_every_failed_judge_call(down):
  report, _, requests, config = down
  num_eval = config.world.num_eval_queries
  judge = report['fallbacks']['eval']['judge']
  openai = judge['openai']
  assert (openai['calls'], openai['failed_calls'], openai['rate']) == (4 * num_eval,
                                                                      4 * num_eval, 1.0)
  assert openai['excluded_queries'] == openai['queries'] == 2 * num_eval
  assert 'HTTP 500' in openai['first_failure']['reason']
  for comparison in ('aligned vs PT', 'aligned vs PT+rephrase'):
    assert openai['comparisons'][comparison]['failed_calls'] == 2 * num_eval
    assert report['judge']['openai'][comparison]['num_judged'] == 0
  assert judge['world']['failed_calls'] == 0 and judge['world']['calls'] == 4 * num_eval
  assert report['degraded']['judge']['openai'] == {'aligned vs PT': ['judge'],
                                                   'aligned vs PT+rephrase': ['rephrase',
                                                                              'judge']}
  assert report['degraded']['judge']['world'] == {'aligned vs PT+rephrase': ['rephrase']}
  # Every call counted is a request the endpoint got (no retries configured).
  rephrased = (report['fallbacks']['mine']['rephrase']['backend_calls']
               + report['fallbacks']['eval']['rephrase']['backend_calls'])
  assert requests == rephrased + openai['calls']


def test_report_md_names_the_fallbacks_near_the_top_and_marks_what_rests_on_them(down):
  report, text, _, config = down
  num_eval = config.world.num_eval_queries
  head = text.split('## Findings')[0]
  assert '## LLM calls and fallbacks' in head and '**Some results rest on fallbacks**' in head
  assert '- † mine: 6 of 6 rephrasings fell back to the original query (rate 1.000)' in head
  hpir = report['fallbacks']['eval']['rephrase']['sections']['hpir']['queries']
  assert (f'- † eval: {num_eval + hpir} of {num_eval + hpir} rephrasings fell back to the '
          'original query (rate 1.000)') in head
  assert f'| eval | rephrase ({TOPK}) | openai:down-chat, detail | {num_eval} | {num_eval} |' \
      in head
  assert (f'- ‡ eval: judge openai: {4 * num_eval} of {4 * num_eval} calls failed '
          '(rate 1.000)') in head
  pt = report['metrics']['PT'][f'{TOPK}/precision']
  assert f'| {TOPK}/precision | {pt:.4f} | {pt:.4f} † |' in text
  t2i = next(line for line in text.splitlines() if line.startswith('| retrieval/t2i_r1 |'))
  assert '†' not in t2i   # retrieval searches with captions: nothing rephrased
  rephrase_findings = [f for f in report['findings'] if 'PT+rephrase' in f['values']
                       and f['metric'].startswith(f'{TOPK}/')]
  assert rephrase_findings and all(f['rests_on_fallbacks'] == ['rephrase']
                                   for f in rephrase_findings)
  for f in rephrase_findings:
    assert text.split(f['finding'], 1)[1].split('\n', 1)[0].endswith(') †'), f['finding']
  mine = report['stages']['mine']['top10_gt_aesthetic_rephrased']
  assert f'- top10_gt_aesthetic_rephrased: {mine:.4f} †' in text


def test_report_md_keeps_the_openai_judge_rows_when_every_call_failed(down):
  _, text, _, config = down
  num_eval = config.world.num_eval_queries
  for comparison, mark in (('aligned vs PT', '‡'), ('aligned vs PT+rephrase', '†‡')):
    for aspect in ('accuracy', 'aesthetic'):
      assert f'| openai | {comparison} | {aspect} |' in text
      assert (f'| openai | {comparison} | {aspect} | n/a | n/a | n/a | n/a | 0/{num_eval} '
              f'{mark} |') in text
  assert '| world | aligned vs PT | aesthetic |' in text


def test_a_healthy_run_reports_no_fallback_and_marks_nothing(healthy, down):
  report, text = healthy
  assert report['degraded'] == dict(any=False, stages={}, metrics={}, judge={}, findings={},
                                    stage_numbers={})
  assert report['fallbacks']['mine']['rephrase']['fallbacks'] == 0
  assert report['fallbacks']['eval']['rephrase']['sections'][TOPK]['rate'] == 0.0
  assert 'No fallback: every rephrasing and every judge call succeeded.' in text
  assert '†' not in text and '‡' not in text
  assert not any('rests_on_fallbacks' in f for f in report['findings'])
  # The fallbacks only touched what rests on the rephraser and the judge.
  for system in ('PT', 'aligned'):
    assert report['metrics'][system] == down[0]['metrics'][system]


def check_report_against_world(report: dict, world, systems=('PT', 'PT+rephrase', 'aligned'),
                               topk: str = TOPK) -> None:
  """Recomputes each system's top-k ground-truth aesthetic and precision from the top-k ids
  report.json records and the world's ground truth, and each finding's verdict from its
  numbers. (Usable on any world run's report, e.g. the smoke job's.)"""
  by_text = {q.text: q for q in world.queries}
  for system in systems:
    top, metrics = report['topk'][system], report['metrics'][system]
    ids = np.asarray(top['ids'], np.int64)
    assert ids.shape == (len(top['queries']), report['config']['evals'][topk]['k'])
    aesthetic = np.mean([world.aesthetic(row) for row in ids])
    precision = np.mean([world.is_relevant(by_text[q], row)
                         for q, row in zip(top['queries'], ids)])
    assert metrics[f'{topk}/aesthetic/ground_truth'] == pytest.approx(aesthetic, abs=1e-6)
    assert metrics[f'{topk}/precision'] == pytest.approx(precision, abs=1e-9)
  assert report['findings']
  kinds = {f['metric'] for f in report['findings']}
  assert {f'{topk}/precision', 'judge/world/aligned vs PT/accuracy'} <= kinds, kinds
  for f in report['findings']:
    (a, va), (b, vb) = list(f['values'].items())[:2]
    if f['metric'] in report['metrics'].get(a, {}):
      assert (va, vb) == (report['metrics'][a][f['metric']], report['metrics'][b][f['metric']])
    text = f['finding']
    if 'judge' in f:   # values: lose and win rates of the judge's accuracy verdicts
      rates = report['judge'][f['judge']][f['comparison']]['rates']['accuracy']
      assert (va, vb) == (rates['lose'], rates['win'])
      holds = va - vb <= 0.05
    elif 'within 2 points' in text:
      holds = abs(va - vb) <= 0.02
    elif 'at most 2 points below' in text:
      holds = va >= vb - 0.02
    elif 'at least as high' in text:
      holds = va >= vb
    else:   # above, raises, better
      holds = va > vb
    assert f['holds'] == holds, f


def test_headline_numbers_and_verdicts_recompute_from_the_recorded_top_k_ids(healthy, down):
  from input_pipeline import world as world_lib
  world = world_lib.World(_config().world)
  for report in (healthy[0], down[0]):
    check_report_against_world(report, world)
    # (Something relevant was retrieved, so precision is checked on more than zeros.)
    assert max(m[f'{TOPK}/precision'] for m in report['metrics'].values()) > 0


def test_markdown_keeps_a_judge_without_rates_and_marks_from_the_counts_alone():
  """report.md from a hand-made report: no models, just the accounting and the markers."""
  from aesalign_jax.evaluation import fallbacks
  from aesalign_jax.evaluation import report as report_lib
  none = dict(win=None, similar=None, lose=None, win_plus_similar=None)
  failed = dict(rates={'aesthetic': none}, num_queries=3, num_judged=0, failures=3,
                failed_calls=6, first_failure=dict(query='q0', reason='connection failed'))
  judged = {'openai': {'aligned vs PT': failed}}
  metrics = {'PT': {'topk_quality/precision': 0.25, 'retrieval/t2i_r1': 0.5},
             'PT+rephrase': {'topk_quality/precision': 0.25, 'retrieval/t2i_r1': 0.5},
             'aligned': {'topk_quality/precision': 0.125, 'retrieval/t2i_r1': 0.5}}
  tally = dict(backend='openai', model='m', style='detail', queries=3, ok=0, fallbacks=3,
               rate=1.0, from_cache=0, backend_calls=3,
               first_fallback=dict(query='q0', reason='connection failed'))
  report = {'metrics': metrics, 'judge': judged, 'stages': {}, 'config': {},
            'findings': [{'finding': 'rephrasing raises precision', 'holds': False,
                          'metric': 'topk_quality/precision',
                          'values': {'PT+rephrase': 0.25, 'PT': 0.25}}]}
  report['fallbacks'] = fallbacks.summarize({}, tally, {'topk_quality': tally}, judged)
  report['degraded'] = fallbacks.degraded(report['fallbacks'], metrics, judged,
                                          report['findings'], 'topk_quality', {})
  assert report['fallbacks']['eval']['judge']['openai']['rate'] == 1.0
  text = report_lib.markdown(report)
  assert '| openai | aligned vs PT | aesthetic | n/a | n/a | n/a | n/a | 0/3 ‡ |' in text
  assert '| topk_quality/precision | 0.2500 | 0.2500 † | 0.1250 |' in text
  assert '| retrieval/t2i_r1 | 0.5000 | 0.5000 | 0.5000 |' in text
  assert 'difference +0.0000) †' in text
  assert "- † eval: 3 of 3 rephrasings fell back to the original query (rate 1.000)" in text
  assert ("- ‡ eval: judge openai: 6 of 6 calls failed (rate 1.000), 3 of 3 queries "
          "excluded from its rates. First: 'q0' (connection failed)") in text
