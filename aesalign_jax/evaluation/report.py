"""Evaluates the three systems of the paper's Table 1 and writes the report.

  PT            the pretrained model, plain queries
  PT+rephrase   the pretrained model, queries rephrased (config.rephrase)
  aligned       the aligned model, plain queries

On one evaluation corpus (EvalCorpus, built by the eval stage): every evaluator of
config.evals (retrieval, zero-shot, top-k quality by every scorer, HPIR-format files) and the
system-level judges (aligned vs PT, aligned vs PT+rephrase, order-consistent). What only a
corpus with ground truth can measure (the embedded world) comes from `corpus.truth`: the
ground-truth aesthetic scorer and relevance, an HPIR benchmark drawn from its simulator
(config.hpir_world), the ground-truth judge, and the paper's claims on the ground truth
(without it, the claims are checked on the IAP score, else the low-level one).
Written to workdir/eval/report.json (every number and the config), report.md and PNG figures.
Rephrasings that fell back and judge calls that failed (an LLM endpoint down) are counted per
stage and the numbers resting on them marked (fallbacks.py: report['fallbacks'],
report['degraded'], report.md's 'LLM calls and fallbacks').
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
from absl import logging

from aesalign_jax import embed, multihost, rephrase
from aesalign_jax.evaluation import common, fallbacks, figures, hpir_eval, hpir_world
from aesalign_jax.evaluation import topk_quality
from aesalign_jax.evaluation import judge as judge_lib

SYSTEMS = ('PT', 'PT+rephrase', 'aligned')


@dataclasses.dataclass
class EvalCorpus:
  """What the systems are evaluated on (the eval stage builds it).

  corpus: input_pipeline.corpus.Corpus (images and captions by row, optional truth);
  scorers: name ('ground_truth', 'lowlevel', 'iap') -> corpus rows -> aesthetic scores (NaN:
  an image that did not load), the same for every system; embeddings: system name -> [N, D]
  that system's image embeddings of the rows where already computed (a stored index); a
  system missing here embeds the rows itself; queries: the held-out search queries (the
  corpus's own), unless the top-k section names a file; summary: counts for the report.
  """
  corpus: object
  scorers: dict
  embeddings: dict = dataclasses.field(default_factory=dict)
  queries: list = dataclasses.field(default_factory=list)
  summary: dict = dataclasses.field(default_factory=dict)

  def images(self, rows) -> np.ndarray:
    return self.corpus.images(np.asarray(rows))[0]


def evaluate(config, pt_model, aligned_model, data: EvalCorpus, out_dir: str,
             stage_summaries: Optional[dict] = None, searcher=None, *,
             across_processes: bool = False) -> dict:
  """pt_model, aligned_model: (ClipConfig, params, tokenizer); stage_summaries: the earlier
  stages' summaries by name, quoted in the report; searcher: the top-k search
  (retrieval.make_searcher(config.retrieval, mesh); None = on the default device). Returns
  the report dict; writes report.json, report.md and the figures (PNG) to out_dir.

  across_processes: every process of a multi-process run calls evaluate at once; the images
  to embed (common.embed_chunks), the rephrasings and the judges' calls are split over them
  and gathered, so every process computes the same report, and process 0 writes it."""
  writer = not across_processes or multihost.is_writer()
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  pt = embed.Embedder(*pt_model)
  rephraser = rephrase.make_rephraser(config.rephrase,
                                      os.path.join(out_dir, 'rephrase_cache.jsonl'),
                                      across_processes=across_processes)
  shared = dict(across_processes=across_processes)
  systems = [common.System('PT', pt, **shared),
             common.System('PT+rephrase', pt, rephrase=rephraser, **shared),
             common.System('aligned', embed.Embedder(*aligned_model), **shared)]
  truth = data.corpus.truth
  simulator = getattr(truth, 'world', None)   # a world that can draw new benchmark items
  evaluators = common.make_evaluators(
      config.evals, corpus=data.corpus, scorers=data.scorers, queries=data.queries,
      corpus_embeddings=data.embeddings, world=simulator, searcher=searcher)
  hpir_path = None
  if simulator is not None:   # written by one process, read by all
    if writer:
      hpir_path = str(hpir_world.generate_hpir(simulator, os.path.join(out_dir, 'hpir'),
                                               config.hpir_world))
    if across_processes:
      hpir_path = multihost.allgather(hpir_path)[0]
  metrics, rephrased = {}, {}
  for system in systems:
    logging.info('evaluating %s', system.name)
    metrics[system.name] = {}
    # One section at a time, to know which sections' numbers rest on rephrasing fallbacks.
    for name, ev in evaluators.items():
      with rephraser.counting() as tally:
        metrics[system.name].update(common.run_evaluators({name: ev}, system))
      if tally.queries:
        rephrased[name] = tally.to_json()
    if hpir_path is not None:
      with rephraser.counting() as tally:
        metrics[system.name].update(hpir_eval.hpir_scores(system, str(hpir_path)))
      if tally.queries:
        rephrased['hpir'] = tally.to_json()
  rephraser.close()
  topk_name = next((name for name, ev in evaluators.items()
                    if isinstance(ev, topk_quality.TopKQualityEvaluator)), None)
  topk = evaluators[topk_name].results if topk_name else {}
  if not topk:
    logging.info('no top-k quality section enabled in config.evals: no judge, no grid')
  judged = _judge_all(_judges(config.judge, data), topk, across_processes) if topk else {}
  claims = CLAIMS if truth is not None else corpus_claims(metrics, topk_name or 'topk_quality')
  report = {'metrics': metrics, 'judge': judged, 'stages': dict(stage_summaries or {}),
            'topk': {name: t.to_json() for name, t in topk.items()},
            'config': json.loads(config.to_json_best_effort())}
  report['findings'] = findings(report, k=config.evals[topk_name].k if topk_name else 0,
                                claims=claims)
  report['fallbacks'] = fallbacks.summarize(report['stages'], rephraser.tally.to_json(),
                                            rephrased, judged)
  report['degraded'] = fallbacks.degraded(report['fallbacks'], metrics, judged,
                                          report['findings'], topk_name, report['stages'])
  for f in report['findings']:
    if f['finding'] in report['degraded']['findings']:
      f['rests_on_fallbacks'] = report['degraded']['findings'][f['finding']]
  if report['degraded']['any']:
    logging.warning('the report rests partly on fallbacks: %s', report['degraded']['stages'])
  if data.summary:
    report['corpus'] = dict(data.summary)
  # The trade-off plot's recall: the first retrieval set's R@10 (e.g. retrieval_coco).
  recalls = sorted({key for m in metrics.values() for key in m if key.endswith('/t2i_r10')})
  if not writer:
    return report
  with open(os.path.join(out_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1, default=float)
  report['figures'] = figures.write_report_figures(
      out_dir, report, corpus_images=data.images,
      recall_key=recalls[0] if recalls else 'retrieval/t2i_r10')
  with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(report))
  return report


def _judge_all(judges, topk, across_processes: bool = False) -> dict:
  """Each judge on aligned vs PT and aligned vs PT+rephrase, over the top-k results (its
  calls split over the processes when they all evaluate: judge_systems)."""
  judged = {}
  for judge_name, judge, images_fn in judges:
    for other in ('PT', 'PT+rephrase'):
      logging.info('judge %s: aligned vs %s', judge_name, other)
      result = judge_lib.judge_systems(
          judge, topk['aligned'].queries,
          judge_lib.groups_from_rows(topk['aligned'].rows, images_fn),
          judge_lib.groups_from_rows(topk[other].rows, images_fn), aspects=judge.aspects,
          across_processes=across_processes)
      entry = {k: result[k]
               for k in ('rates', 'num_queries', 'num_judged', 'failures', 'failed_calls')}
      failed = next((p for p in result['per_query'] if p['outcome'] is None), None)
      if failed is not None:   # an example for the report's fallbacks section
        entry['first_failure'] = dict(query=failed['query'],
                                      reason=next((r for r in failed['reasons'] if r), ''))
      judged.setdefault(judge_name, {})[f'aligned vs {other}'] = entry
  return judged


def _judges(c, data: EvalCorpus) -> list:
  """(name, judge, images_fn) for each judge: the ground truth's when the corpus has one, the
  scorer judge when config.judge.kind asks for it or there is no ground truth (aesthetic
  only: IAP, else the low-level score), and the LMM judge (kind 'openai') on the images.
  Groups carry pixels (images_fn) only for judges that look at them."""
  margins = dict(accuracy_margin=c.accuracy_margin, aesthetic_margin=c.aesthetic_margin)
  truth, out = data.corpus.truth, []
  if truth is not None:
    out.append(('world', judge_lib.WorldJudge(truth.world, row_ids=truth.index, **margins),
                None))
  elif c.kind == 'world':
    raise ValueError("config.judge.kind='world' judges by the ground truth, which this corpus "
                     "does not have: set it to 'scorer' or 'openai'")
  if c.kind == 'scorer' or truth is None:
    aesthetic = data.scorers.get('iap') or data.scorers.get('lowlevel')
    if aesthetic is not None:   # never the ground truth itself
      out.append(('scorer', judge_lib.ScorerJudge(lambda group: aesthetic(group.rows), None,
                                                  **margins), None))
  if c.kind == 'openai':
    out.append(('openai', judge_lib.make_judge(c), data.images))
  elif c.kind not in ('world', 'scorer'):
    judge_lib.make_judge(c)   # raises, naming the bad kind
  return out


# (finding, system a, system b, metric, how a must compare with b, tolerance)
CLAIMS = (
    ('aligned top-{k} ground-truth aesthetic above PT', 'aligned', 'PT',
     'topk_quality/aesthetic/ground_truth', 'above', 0.0),
    ('aligned HPIR aesthetic score above PT', 'aligned', 'PT', 'hpir/aesthetic', 'above', 0.0),
    ('aligned text-to-image R@1 within 2 points of PT', 'aligned', 'PT', 'retrieval/t2i_r1',
     'within', 0.02),
    ('aligned precision@{k} kept (at most 2 points below PT)', 'aligned', 'PT',
     'topk_quality/precision', 'not below', 0.02),
    ('rephrasing raises top-{k} ground-truth aesthetic (PT+rephrase above PT)', 'PT+rephrase',
     'PT', 'topk_quality/aesthetic/ground_truth', 'above', 0.0),
    ('aligned plain-query top-{k} aesthetic matches PT+rephrase (at least as high)', 'aligned',
     'PT+rephrase', 'topk_quality/aesthetic/ground_truth', 'at least', 0.0),
)


# Accuracy kept by the judges' verdict: aligned vs PT, lose minus win at most this.
JUDGED_ACCURACY = ('aligned vs PT', 0.05)


def corpus_claims(metrics: dict, topk_name: str = 'topk_quality') -> tuple:
  """CLAIMS for a real corpus: the top-k claims on the IAP score (the low-level score without
  one) in place of the world's ground truth, and recall on each retrieval set evaluated."""
  keys = {key for m in metrics.values() for key in m}
  scorer = next((name for name in ('iap', 'lowlevel')
                 if f'{topk_name}/aesthetic/{name}' in keys), 'iap')
  label = {'iap': 'IAP', 'lowlevel': 'low-level'}[scorer]
  out = []
  for text, a, b, key, how, tol in CLAIMS:
    if key == 'topk_quality/aesthetic/ground_truth':
      out.append((text.replace('ground-truth', label), a, b,
                  f'{topk_name}/aesthetic/{scorer}', how, tol))
    elif key == 'retrieval/t2i_r1':
      for recall in sorted(k for k in keys if k.endswith('/t2i_r1')):
        section = recall.rpartition('/')[0]
        out.append((text.replace('R@1', f'R@1 ({section})'), a, b, recall, how, tol))
    else:
      out.append((text, a, b, key, how, tol))
  return tuple(out)


def findings(report: dict, k: int, claims=CLAIMS) -> list[dict]:
  """The claims the run must show (CLAIMS; corpus_claims on a real corpus), each with its
  numbers and whether it holds; a claim whose metric was not measured is left out."""
  metrics, out = report['metrics'], []
  for text, a, b, key, how, tol in claims:
    if key not in metrics.get(a, {}) or key not in metrics.get(b, {}):
      continue
    va, vb = metrics[a][key], metrics[b][key]
    holds = {'above': va > vb, 'at least': va >= vb, 'within': abs(va - vb) <= tol,
             'not below': va >= vb - tol}[how]
    out.append({'finding': text.format(k=k), 'holds': bool(holds), 'metric': key,
                'values': {a: va, b: vb}})
  for name, comparisons in sorted(report.get('judge', {}).items()):
    rates = (comparisons.get(JUDGED_ACCURACY[0], {}).get('rates') or {}).get('accuracy', {})
    lose, win = rates.get('lose'), rates.get('win')
    if lose is None or win is None:
      continue   # a judge without accuracy verdicts (aesthetic only, or every call failed)
    out.append({'finding': f'the {name} judge finds the aligned model not less accurate than '
                           f'PT (accuracy lose - win at most {JUDGED_ACCURACY[1]})',
                'holds': bool(lose - win <= JUDGED_ACCURACY[1]),
                'metric': f'judge/{name}/{JUDGED_ACCURACY[0]}/accuracy',
                'values': {'lose': lose, 'win': win}, 'judge': name,
                'comparison': JUDGED_ACCURACY[0]})
  aes = report.get('stages', {}).get('aesthetic', {})
  if 'iap_spearman_vs_truth' in aes:
    iap_r, low_r = aes['iap_spearman_vs_truth'], aes['lowlevel_spearman_vs_truth']
    out.append({'finding': 'the IAP predictor (world ratings over PT embeddings) predicts the '
                           'held-out ground truth better than the low-level score',
                'holds': bool(iap_r > low_r), 'metric': 'Spearman vs ground truth',
                'values': {'IAP': iap_r, 'low-level': low_r},
                'images': aes.get('test_images')})
  return out


def _fmt(v) -> str:
  if isinstance(v, float) and v.is_integer() and abs(v) >= 1:
    return str(int(v))   # counts
  return f'{v:.4f}' if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
  """The LLM calls and what fell back, findings, the Table-1-like summary (one row per
  metric, one column per system), the judges' win rates, the earlier stages' numbers, the
  figures and the config. Numbers resting on fallbacks carry fallbacks.MARKERS."""
  marks = report.get('degraded') or {}
  lines = ['# aesalign report', '']
  section = fallbacks.markdown(report)
  if section:
    lines += section + ['']
  lines += ['## Findings', '']
  for f in report.get('findings', []):
    (a, va), (b, vb) = list(f['values'].items())[:2]
    values = f'{a} {_fmt(va)}, {b} {_fmt(vb)}, difference {va - vb:+.4f}'
    mark = fallbacks.marker(marks.get('findings', {}).get(f['finding']))
    lines.append(f"- **{'holds' if f['holds'] else 'does not hold'}**: {f['finding']} "
                 f"({f['metric']}: {values}){mark}")
  metrics = report['metrics']
  names = sorted({k for m in metrics.values() for k in m})
  lines += ['', '## Metrics (held-out queries and images)', '',
            '| metric | ' + ' | '.join(SYSTEMS) + ' |', '|---|' + '---|' * len(SYSTEMS)]
  marked = marks.get('metrics', {})
  for name in names:
    cells = [_fmt(metrics[s][name]) + fallbacks.marker(marked.get(s, {}).get(name))
             if name in metrics.get(s, {}) else '' for s in SYSTEMS]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Judges (order-consistent: each query judged twice, order swapped)', '',
            '| judge | comparison | aspect | win | similar | lose | win+similar | judged |',
            '|---|---|---|---|---|---|---|---|']
  for judge_name, comparisons in report['judge'].items():
    for comparison, result in comparisons.items():
      mark = fallbacks.marker(marks.get('judge', {}).get(judge_name, {}).get(comparison))
      for aspect, r in (result['rates'] or {}).items():
        # A judge whose every call failed has no rates; its rows stay, to say so.
        rates = [r and r[key] for key in ('win', 'similar', 'lose', 'win_plus_similar')]
        cells = ' | '.join('n/a' if v is None else f'{v:.3f}' for v in rates)
        lines.append(f"| {judge_name} | {comparison} | {aspect} | {cells} | "
                     f"{result['num_judged']}/{result['num_queries']}{mark} |")
  if report.get('corpus'):
    lines += ['', '## Corpus (config.data)', ''] + [
        f'- {k}: {_fmt(v)}' for k, v in report['corpus'].items()
        if isinstance(v, (int, float, str))]
  for stage, summary in report.get('stages', {}).items():
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    marked = marks.get('stage_numbers', {}).get(stage, {})
    lines += ['', f'## Stage {stage}', ''] + [
        f'- {k}: {_fmt(v)}{fallbacks.marker(marked.get(k))}' for k, v in flat.items()]
  if report.get('figures'):
    lines += ['', '## Figures', ''] + [f'![{os.path.basename(p)}]({os.path.basename(p)})'
                                        for p in report['figures']]
  lines += ['', '## Config', '', '```json', json.dumps(report['config'], indent=1), '```']
  return '\n'.join(lines) + '\n'
