"""Evaluates the three systems of the paper's Table 1 and writes the report.

  PT            the pretrained model, plain queries
  PT+rephrase   the pretrained model, queries rephrased (config.rephrase)
  aligned       the aligned model, plain queries

Numbers: every evaluator of config.evals (retrieval, zero-shot, top-k quality by every scorer),
the HPIR-format benchmark (accuracy and aesthetic scores), and the system-level judge (aligned
vs PT, aligned vs PT+rephrase, order-consistent, config.judge). Written to
workdir/eval/report.json (every number and the config) and report.md (a table).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
from absl import logging
from PIL import Image

from aesalign_jax import embed, rephrase
from aesalign_jax.aesthetics import iap
from aesalign_jax.evaluation import common, hpir, hpir_world, judge as judge_lib, topk_quality

SYSTEMS = ('PT', 'PT+rephrase', 'aligned')


def _hpir_scores(system: common.System, path: str) -> dict:
  """HPIR accuracy and aesthetic scores; every image and query is embedded once, batched."""
  loaded = hpir.load_hpir(path)
  groups = [item.paths(loaded.root) for item in loaded.items]
  unique = sorted({str(p) for a, b in groups for p in (*a, *b)})
  images = np.stack([np.asarray(Image.open(p).convert('RGB')) for p in unique])
  emb = dict(zip(unique, system.embed_images(images)))
  queries = sorted({item.query for item in loaded.items})
  q_emb = dict(zip(queries, system.embed_texts(system.query_texts(queries))))
  sims = [(np.stack([emb[str(p)] for p in a]) @ q_emb[item.query],
           np.stack([emb[str(p)] for p in b]) @ q_emb[item.query])
          for item, (a, b) in zip(loaded.items, groups)]
  scores = hpir.score_hpir(loaded.items, sims)
  return {f'hpir/{aspect}': float(s.score) for aspect, s in scores.items()}


def evaluate(config, world, pt_model, aligned_model, iap_weights: Optional[str],
             out_dir: str) -> dict:
  """pt_model, aligned_model: (ClipConfig, params, tokenizer). Returns the report dict."""
  os.makedirs(out_dir, exist_ok=True)
  pt = embed.Embedder(*pt_model)
  aligned = embed.Embedder(*aligned_model)
  rephraser = rephrase.make_rephraser(config.rephrase,
                                      os.path.join(out_dir, 'rephrase_cache.jsonl'))
  systems = [common.System('PT', pt), common.System('PT+rephrase', pt, rephrase=rephraser),
             common.System('aligned', aligned)]

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
  world_judge = judge_lib.WorldJudge(world, row_ids=corpus_idx)
  judged = {}
  for other in ('PT', 'PT+rephrase'):
    judged[f'aligned vs {other}'] = judge_lib.judge_systems(
        world_judge, topk['aligned'].queries, list(topk['aligned'].rows), list(topk[other].rows))
  rephraser.close()
  report = {'metrics': metrics, 'judge': {k: {'rates': v['rates'], 'failures': v['failures'],
                                              'num_queries': v['num_queries']}
                                          for k, v in judged.items()},
            'topk': {name: t.to_json() for name, t in topk.items()},
            'config': json.loads(config.to_json_best_effort())}
  with open(os.path.join(out_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1, default=float)
  with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(report))
  return report


def markdown(report: dict) -> str:
  """The Table-1-like summary: one row per metric, one column per system, then the judge."""
  metrics = report['metrics']
  names = sorted({k for m in metrics.values() for k in m})
  lines = ['# aesalign report', '', '| metric | ' + ' | '.join(SYSTEMS) + ' |',
           '|---|' + '---|' * len(SYSTEMS)]
  for name in names:
    cells = [f'{metrics[s][name]:.4f}' if name in metrics.get(s, {}) else '' for s in SYSTEMS]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  lines += ['', '## Judge (world ground truth, order-consistent)', '',
            '| comparison | aspect | win | similar | lose | win+similar |', '|---|---|---|---|---|---|']
  for comparison, result in report['judge'].items():
    for aspect, r in (result['rates'] or {}).items():
      if r is None:
        continue
      lines.append(f"| {comparison} | {aspect} | {r['win']:.3f} | {r['similar']:.3f} | "
                   f"{r['lose']:.3f} | {r['win_plus_similar']:.3f} |")
  return '\n'.join(lines) + '\n'
