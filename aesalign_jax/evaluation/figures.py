"""The report's figures, as PNG files: retrieval grids, training curves, the trade-off plot.

    paths = write_report_figures(out_dir, report, world=world)   # all of them, from report.json

or one at a time, from plain data (no model, no world):
    retrieval_grid(path, queries, images, captions, relevant=.., notes=..)
    retrieval_grid(path, **grid_inputs(report['topk'], world.render_batch, query_indices=[0, 5]))
    training_curves(path, 'workdir/pretrain/metrics.jsonl', 'workdir/align/metrics.jsonl')
    tradeoff(path, tradeoff_points(report['metrics']), baseline='PT')

Drawn with matplotlib's object API on the Agg canvas (no pyplot: no GUI, no global state,
safe to call from any thread). Bad inputs raise ValueError naming the system, query, file or
key at fault; a torn line in a metrics file (a crash mid-write) is skipped with a warning.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from absl import logging

# The figures, importable from here (figures.retrieval_grid, figures.SYSTEM_COLOURS...).
from aesalign_jax.evaluation.figures_curves import read_metrics_jsonl, training_curves
from aesalign_jax.evaluation.figures_grid import (GRID_SCORERS, OFF_TOPIC, ON_TOPIC, grid_inputs,
                                                  retrieval_grid)
from aesalign_jax.evaluation.figures_style import SYSTEM_COLOURS
from aesalign_jax.evaluation.figures_tradeoff import tradeoff, tradeoff_points

__all__ = ['GRID_SCORERS', 'OFF_TOPIC', 'ON_TOPIC', 'SYSTEM_COLOURS', 'grid_inputs',
           'read_metrics_jsonl', 'retrieval_grid', 'tradeoff', 'tradeoff_points',
           'training_curves', 'write_report_figures']


def write_report_figures(out_dir: str, report: Mapping, *, world=None,
                         corpus_images: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                         workdir: Optional[str] = None, num_queries: int = 4,
                         query_indices: Optional[Sequence[int]] = None, k: int = 6,
                         recall_key: str = 'retrieval/t2i_r10',
                         extra_points: Optional[Mapping[str, Sequence[float]]] = None
                         ) -> list[str]:
  """The report's figures under out_dir; returns the paths written.

  - retrieval_grid.png: `num_queries` held-out queries, evenly spaced over the list (not
    picked by outcome; or the positions `query_indices`), top `k` of each system. Images
    from `world.render_batch` on the topk ids, or else `corpus_images(rows)`; neither
    given: no grid.
  - training_curves.png: from workdir/pretrain/metrics.jsonl and workdir/align/metrics.jsonl
    (workdir defaults to out_dir's parent); skipped, with a log line, when neither exists.
  - tradeoff.png: `recall_key` (a report metric, e.g. retrieval/t2i_r1) vs the top-k
    ground-truth aesthetic per system (the IAP score where no ground truth was measured, the
    low-level one where neither was),
    arrows from PT, plus `extra_points` ((recall, aesthetic) by name, e.g. other lambdas).
  """
  paths = []
  topk = report.get('topk') or {}
  if topk and (world is not None or corpus_images is not None):
    first = next(iter(topk.values()))
    q = len(first['queries'])
    picks = (list(query_indices) if query_indices is not None else
             sorted({int(round(v)) for v in np.linspace(0, q - 1, min(num_queries, q))}))
    if world is not None:
      inputs = grid_inputs(topk, world.render_batch, query_indices=picks, k=k, key='ids')
    else:
      inputs = grid_inputs(topk, corpus_images, query_indices=picks, k=k, key='rows')
    paths.append(retrieval_grid(os.path.join(out_dir, 'retrieval_grid.png'), **inputs))
  else:
    logging.info('report figures: no top-k results or no image source; no retrieval grid')

  workdir = workdir or os.path.dirname(os.path.abspath(out_dir))
  jsonl = {stage: os.path.join(workdir, stage, 'metrics.jsonl') for stage in ('pretrain', 'align')}
  jsonl = {stage: p if os.path.exists(p) else None for stage, p in jsonl.items()}
  if any(jsonl.values()):
    paths.append(training_curves(os.path.join(out_dir, 'training_curves.png'),
                                 jsonl['pretrain'], jsonl['align']))
  else:
    logging.info('report figures: no metrics.jsonl under %s/{pretrain,align}; no curves', workdir)

  metrics = report.get('metrics') or {}
  kk = report.get('config', {}).get('evals', {}).get('topk_quality', {}).get('k')
  for scorer, label in (('ground_truth', 'ground-truth'), ('iap', 'IAP'),
                        ('lowlevel', 'low-level')):
    key = f'topk_quality/aesthetic/{scorer}'
    if metrics and all(key in m and recall_key in m for m in metrics.values()):
      paths.append(tradeoff(os.path.join(out_dir, 'tradeoff.png'),
                            tradeoff_points(metrics, recall_key=recall_key, aesthetic_key=key),
                            extra_points=extra_points,
                            baseline='PT' if 'PT' in metrics else next(iter(metrics)),
                            recall_label=_recall_label(recall_key),
                            aesthetic_label=f'mean {label} aesthetic of the top {kk or "k"}'))
      break
  else:
    logging.info('report figures: metrics lack %s or a top-k aesthetic; no trade-off plot',
                 recall_key)
  return paths


def _recall_label(key: str) -> str:
  """'retrieval/t2i_r10' -> 'text-to-image R@10 (retrieval)'; other keys as they are."""
  section, _, name = key.rpartition('/')
  for prefix, words in (('t2i_r', 'text-to-image'), ('i2t_r', 'image-to-text')):
    if name.startswith(prefix) and name[len(prefix):].isdigit():
      return f'{words} R@{name[len(prefix):]}' + (f' ({section})' if section else '')
  return key
