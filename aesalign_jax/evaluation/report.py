"""Evaluates the three systems of the paper's Table 1 and writes the report.

  PT            the pretrained model, plain queries
  PT+rephrase   the pretrained model, queries rephrased (config.rephrase)
  aligned       the aligned model, plain queries

Numbers: every evaluator of config.evals (retrieval, zero-shot, top-k quality by every scorer,
an HPIR-format file), the HPIR-format benchmark (accuracy and aesthetic scores), and the
system-level judge (aligned vs PT, aligned vs PT+rephrase, order-consistent, config.judge).
Written to workdir/eval/report.json (every number and the config) and report.md (a table).

Two settings:
- the embedded world (`world` given): top-k quality on the world's held-out split, scored by
  its ground truth, the IAP head and the low-level score; HPIR on a file generated from the
  world (config.hpir_world); the world's ground-truth judge plus config.judge.kind.
- a real corpus (`corpus` given, built by stages.eval_stage from config.data): top-k quality
  of the held-out queries of evals.<topk>.queries_path over the corpus, scored by the
  configured aesthetic models (no ground truth, no relevance); HPIR only from a file an
  `hpir` section of config.evals names; the scorer judge plus the openai one if configured.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import numpy as np
from absl import logging
from PIL import Image

from aesalign_jax import embed, rephrase
from aesalign_jax.aesthetics import iap
from aesalign_jax.evaluation import common, figures, hpir, hpir_world, topk_quality
from aesalign_jax.evaluation import judge as judge_lib
from input_pipeline import images as images_lib

SYSTEMS = ('PT', 'PT+rephrase', 'aligned')


def _load_rgb(path: str, size: Optional[int]) -> np.ndarray:
  """An image file as uint8 RGB, resized and centre-cropped to size x size if it is not."""
  with Image.open(path) as im:
    image = np.asarray(im.convert('RGB'))
  if size and image.shape[:2] != (size, size):
    image = images_lib.resize_and_center_crop(image, size)
  return image


def _hpir_aspect_scores(system: common.System, path: str) -> tuple[dict, int, int]:
  """(AspectScore per aspect, items scored, items skipped) of one system on an HPIR file.
  Every image and query is embedded once, batched; images are brought to the model's side.
  An item with an image that does not load is skipped, counted and named in a warning."""
  loaded = hpir.load_hpir(path)
  size = getattr(getattr(system.embedder, 'cfg', None), 'image_size', None)
  groups = [item.paths(loaded.root) for item in loaded.items]
  unique = sorted({str(p) for a, b in groups for p in (*a, *b)})
  pixels, failed = {}, {}
  for p in unique:
    try:
      pixels[p] = _load_rgb(p, size)
    except (OSError, ValueError) as e:   # missing, truncated or not an image
      failed[p] = f'{type(e).__name__}: {e}'
  keep = [i for i, (a, b) in enumerate(groups) if all(str(p) in pixels for p in (*a, *b))]
  if failed:
    logging.warning('HPIR file %s: %d images do not load, %d of %d items skipped; e.g. %s',
                    path, len(failed), len(groups) - len(keep), len(groups),
                    list(failed.items())[:3])
  if not keep:
    raise ValueError(f'HPIR file {path}: no item left to score ({len(loaded.items)} read, '
                     f'{len(loaded.bad_lines)} malformed lines, {len(failed)} images that do '
                     'not load)')
  items, groups = [loaded.items[i] for i in keep], [groups[i] for i in keep]
  emb = dict(zip(pixels, system.embed_images(np.stack(list(pixels.values())))))
  queries = sorted({item.query for item in items})
  q_emb = dict(zip(queries, system.embed_texts(system.query_texts(queries))))
  sims = [(np.stack([emb[str(p)] for p in a]) @ q_emb[item.query],
           np.stack([emb[str(p)] for p in b]) @ q_emb[item.query])
          for item, (a, b) in zip(items, groups)]
  return hpir.score_hpir(items, sims), len(items), len(loaded.items) - len(items)


def _hpir_scores(system: common.System, path: str) -> dict:
  """HPIR accuracy and aesthetic scores ('hpir/<aspect>'; NaN for an aspect no item labels)."""
  scores, _, _ = _hpir_aspect_scores(system, path)
  return {f'hpir/{aspect}': float(s.score) for aspect, s in scores.items()}


@common.register('hpir')
class HPIREvaluator(common.Evaluator):
  """HPIR scores of each system on the HPIR-format file config.path (hpir.default_config;
  '' = skip): '<aspect>' for the aspects the file labels, 'items' scored, 'items_skipped'
  (an image that does not load)."""

  def run(self, system: common.System) -> dict[str, float]:
    path = self.config.get('path', '')
    if not path:
      return {}
    scores, scored, skipped = _hpir_aspect_scores(system, path)
    out = {aspect: float(s.score) for aspect, s in scores.items() if s.items_counted}
    out.update(items=float(scored), items_skipped=float(skipped))
    return out


@dataclasses.dataclass
class Corpus:
  """A real corpus (config.data) to evaluate on; stages.eval_stage builds it.

  ids: [N] the record ids of the corpus rows (images that failed to decode are left out);
  images(rows) -> uint8 [n, S, S, 3] of rows; scorers: name ('iap', 'lowlevel') -> corpus
  rows -> aesthetic scores (NaN: an image that did not load), the same for every system;
  embeddings: system name -> [N, D] that system's own image embeddings of the rows, where
  already computed (a stored index); a system missing here embeds the rows itself;
  summary: counts quoted in the report.
  """
  ids: np.ndarray
  images: Callable[[np.ndarray], np.ndarray]
  scorers: dict
  embeddings: dict = dataclasses.field(default_factory=dict)
  summary: dict = dataclasses.field(default_factory=dict)


def evaluate(config, world, pt_model, aligned_model, iap_weights: Optional[str],
             out_dir: str, stage_summaries: Optional[dict] = None, *,
             corpus: Optional[Corpus] = None) -> dict:
  """pt_model, aligned_model: (ClipConfig, params, tokenizer); stage_summaries: the earlier
  stages' summaries by name (e.g. 'aesthetic', 'mine'), quoted in the report. world: the
  embedded world, or None with `corpus` (a real corpus; iap_weights is then unused: the
  corpus's scorers hold the aesthetic models).

  Returns the report dict; writes report.json, report.md and the figures (PNG) to out_dir.
  """
  if (world is None) == (corpus is None):
    raise ValueError('report.evaluate: give the world or a real corpus, not both or neither')
  os.makedirs(out_dir, exist_ok=True)
  pt = embed.Embedder(*pt_model)
  aligned = embed.Embedder(*aligned_model)
  rephraser = rephrase.make_rephraser(config.rephrase,
                                      os.path.join(out_dir, 'rephrase_cache.jsonl'))
  systems = [common.System('PT', pt), common.System('PT+rephrase', pt, rephrase=rephraser),
             common.System('aligned', aligned)]

  if corpus is not None:
    return _evaluate_corpus(config, corpus, systems, rephraser, out_dir, stage_summaries)
  corpus_idx = world.split_indices(config.evals.topk_quality.split)
  iap_fn = None
  if iap_weights:
    head, activation = iap.load_params(iap_weights)
    pt_corpus = pt.images(world.render_batch(corpus_idx))   # IAP reads the PT model's space
    iap_fn = lambda rows: np.asarray(iap.apply(head, pt_corpus[rows], activation=activation))
  scorers = topk_quality.world_scorers(world, corpus_idx, iap=iap_fn)
  evaluators = common.make_evaluators(config.evals, world=world, scorers=scorers)
  hpir_path = hpir_world.generate_hpir(world, os.path.join(out_dir, 'hpir'), config.hpir_world)

  metrics = {}
  for system in systems:
    logging.info('evaluating %s', system.name)
    metrics[system.name] = {**common.run_evaluators(evaluators, system),
                            **_hpir_scores(system, str(hpir_path))}
  topk = evaluators['topk_quality'].results
  rephraser.close()
  judges = _judges(config.judge, world, corpus_idx, scorers)
  report = _build_report(config, metrics, _judge_all(judges, topk), topk, stage_summaries,
                         findings_k=config.evals.topk_quality.k)
  return _write(report, out_dir, world=world)


def _evaluate_corpus(config, corpus: Corpus, systems, rephraser, out_dir: str,
                     stage_summaries) -> dict:
  """evaluate() on a real corpus (see the module docstring)."""
  evaluators = common.make_evaluators(
      config.evals, scorers=corpus.scorers, corpus_size=len(corpus.ids),
      corpus_images=corpus.images, corpus_ids=np.asarray(corpus.ids),
      corpus_embeddings=corpus.embeddings)
  metrics = {}
  for system in systems:
    logging.info('evaluating %s', system.name)
    metrics[system.name] = common.run_evaluators(evaluators, system)
  rephraser.close()
  topk_name = next((name for name, ev in evaluators.items()
                    if isinstance(ev, topk_quality.TopKQualityEvaluator)), None)
  topk = evaluators[topk_name].results if topk_name else {}
  if not topk:
    logging.info('no top-k quality section enabled in config.evals: no judge, no grid')
  judged = _judge_all(_corpus_judges(config.judge, corpus), topk) if topk else {}
  k = config.evals[topk_name].k if topk_name else 0
  report = _build_report(config, metrics, judged, topk, stage_summaries, findings_k=k,
                         claims=corpus_claims(metrics, topk_name or 'topk_quality'))
  report['corpus'] = dict(corpus.summary)
  # The trade-off plot's recall: the first retrieval set's R@10 (e.g. retrieval_coco).
  recalls = sorted({key for m in metrics.values() for key in m if key.endswith('/t2i_r10')})
  return _write(report, out_dir, corpus_images=corpus.images,
                recall_key=recalls[0] if recalls else 'retrieval/t2i_r10')


def _judge_all(judges, topk) -> dict:
  """Each judge on aligned vs PT and aligned vs PT+rephrase, over the top-k results."""
  judged = {}
  for judge_name, judge, images_fn in judges:
    for other in ('PT', 'PT+rephrase'):
      logging.info('judge %s: aligned vs %s', judge_name, other)
      result = judge_lib.judge_systems(
          judge, topk['aligned'].queries,
          judge_lib.groups_from_rows(topk['aligned'].rows, images_fn),
          judge_lib.groups_from_rows(topk[other].rows, images_fn), aspects=judge.aspects)
      judged.setdefault(judge_name, {})[f'aligned vs {other}'] = {
          k: result[k] for k in ('rates', 'num_queries', 'num_judged', 'failures', 'failed_calls')}
  return judged


def _build_report(config, metrics, judged, topk, stage_summaries, *, findings_k: int,
                  claims=None) -> dict:
  report = {'metrics': metrics, 'judge': judged, 'stages': dict(stage_summaries or {}),
            'topk': {name: t.to_json() for name, t in topk.items()},
            'config': json.loads(config.to_json_best_effort())}
  report['findings'] = findings(report, k=findings_k, claims=CLAIMS if claims is None else claims)
  return report


def _write(report: dict, out_dir: str, **figure_kwargs) -> dict:
  """Writes report.json, the figures and report.md; returns the report with its figures."""
  with open(os.path.join(out_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1, default=float)
  report['figures'] = figures.write_report_figures(out_dir, report, **figure_kwargs)
  with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(report))
  return report


def _judges(c, world, corpus_idx, scorers):
  """(name, judge, images_fn) for the world's ground truth and, if different, config.judge.kind.

  Groups carry the rendered pixels (images_fn) only for judges that look at them.
  """
  render = lambda rows: world.render_batch(corpus_idx[np.asarray(rows)])
  margins = dict(accuracy_margin=c.accuracy_margin, aesthetic_margin=c.aesthetic_margin)
  out = [('world', judge_lib.WorldJudge(world, row_ids=corpus_idx, **margins), None)]
  kind = c.kind
  if kind == 'scorer':
    aesthetic = scorers.get('iap') or scorers['lowlevel']   # never the ground truth itself
    out.append(('scorer', judge_lib.ScorerJudge(lambda group: aesthetic(group.rows), None,
                                                **margins), None))
  elif kind == 'openai':
    out.append(('openai', judge_lib.make_judge(c), render))
  elif kind != 'world':
    judge_lib.make_judge(c)   # raises, naming the bad kind
  return out


def _corpus_judges(c, corpus: Corpus):
  """(name, judge, images_fn) on a real corpus: the scorer judge (aesthetic only: IAP, else the
  low-level score) and, with config.judge.kind 'openai', the LMM judge on the images."""
  if c.kind == 'world':
    raise ValueError("config.judge.kind='world' judges by the embedded world's ground truth, "
                     "which a real corpus does not have: set it to 'scorer' or 'openai'")
  margins = dict(accuracy_margin=c.accuracy_margin, aesthetic_margin=c.aesthetic_margin)
  out = []
  aesthetic = corpus.scorers.get('iap') or corpus.scorers.get('lowlevel')
  if aesthetic is not None:
    out.append(('scorer', judge_lib.ScorerJudge(lambda group: aesthetic(group.rows), None,
                                                **margins), None))
  if c.kind == 'openai':
    out.append(('openai', judge_lib.make_judge(c), corpus.images))
  elif c.kind != 'scorer':
    judge_lib.make_judge(c)   # raises, naming the bad kind
  return out


# (finding, system a, system b, metric, how a must compare with b, tolerance)
CLAIMS = (
    ('aligned top-{k} ground-truth aesthetic above PT', 'aligned', 'PT',
     'topk_quality/aesthetic/ground_truth', 'above', 0.0),
    ('aligned HPIR aesthetic score above PT', 'aligned', 'PT', 'hpir/aesthetic', 'above', 0.0),
    ('aligned text-to-image R@1 within 2 points of PT', 'aligned', 'PT', 'retrieval/t2i_r1',
     'within', 0.02),
    ('rephrasing raises top-{k} ground-truth aesthetic (PT+rephrase above PT)', 'PT+rephrase',
     'PT', 'topk_quality/aesthetic/ground_truth', 'above', 0.0),
    ('aligned plain-query top-{k} aesthetic matches PT+rephrase (at least as high)', 'aligned',
     'PT+rephrase', 'topk_quality/aesthetic/ground_truth', 'at least', 0.0),
)


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
    holds = {'above': va > vb, 'at least': va >= vb, 'within': abs(va - vb) <= tol}[how]
    out.append({'finding': text.format(k=k), 'holds': bool(holds), 'metric': key,
                'values': {a: va, b: vb}})
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
  """Findings, the Table-1-like summary (one row per metric, one column per system), the
  judges' win rates, the earlier stages' numbers, the figures and the config."""
  lines = ['# aesalign report', '', '## Findings', '']
  for f in report.get('findings', []):
    (a, va), (b, vb) = list(f['values'].items())[:2]
    values = f'{a} {_fmt(va)}, {b} {_fmt(vb)}, difference {va - vb:+.4f}'
    lines.append(f"- **{'holds' if f['holds'] else 'does not hold'}**: {f['finding']} "
                 f"({f['metric']}: {values})")
  metrics = report['metrics']
  names = sorted({k for m in metrics.values() for k in m})
  lines += ['', '## Metrics (held-out queries and images)', '',
            '| metric | ' + ' | '.join(SYSTEMS) + ' |', '|---|' + '---|' * len(SYSTEMS)]
  for name in names:
    cells = [_fmt(metrics[s][name]) if name in metrics.get(s, {}) else '' for s in SYSTEMS]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Judges (order-consistent: each query judged twice, order swapped)', '',
            '| judge | comparison | aspect | win | similar | lose | win+similar | judged |',
            '|---|---|---|---|---|---|---|---|']
  for judge_name, comparisons in report['judge'].items():
    for comparison, result in comparisons.items():
      for aspect, r in (result['rates'] or {}).items():
        if r is None or r['win'] is None:
          continue
        lines.append(f"| {judge_name} | {comparison} | {aspect} | {r['win']:.3f} | "
                     f"{r['similar']:.3f} | {r['lose']:.3f} | {r['win_plus_similar']:.3f} | "
                     f"{result['num_judged']}/{result['num_queries']} |")
  if report.get('corpus'):
    lines += ['', '## Corpus (config.data)', ''] + [
        f'- {k}: {_fmt(v)}' for k, v in report['corpus'].items()
        if isinstance(v, (int, float, str))]
  for stage, summary in report.get('stages', {}).items():
    flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    lines += ['', f'## Stage {stage}', ''] + [f'- {k}: {_fmt(v)}' for k, v in flat.items()]
  if report.get('figures'):
    lines += ['', '## Figures', ''] + [f'![{os.path.basename(p)}]({os.path.basename(p)})'
                                        for p in report['figures']]
  lines += ['', '## Config', '', '```json', json.dumps(report['config'], indent=1), '```']
  return '\n'.join(lines) + '\n'
