"""The training curves figure: loss and reward curves of the pretrain and align stages, read
from their metrics.jsonl files."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from absl import logging
from matplotlib.figure import Figure

from aesalign_jax.evaluation.figures_style import OTHER_COLOURS, SYSTEM_COLOURS, save_png


def read_metrics_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl (aesalign_jax.metrics.MetricLogger), in file order.

  A line that is not a JSON object with a 'step' (a torn write) is skipped and counted in one
  warning; a missing file, or one without a single good record, raises ValueError.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(f'metrics file {path} does not exist')
  records, bad = [], 0
  with open(path, encoding='utf-8') as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        record['step'] = int(record['step'])
      except (ValueError, KeyError, TypeError):
        bad += 1
        continue
      records.append(record)
  if bad:
    logging.warning('%s: skipped %d unreadable line(s)', path, bad)
  if not records:
    raise ValueError(f'metrics file {path} holds no records (empty or unreadable)')
  return records


# (stage, title, [(key, legend label)], y label, reference line (y, label) or None)
_PANELS = (
    ('pretrain', 'Pretrain: contrastive (InfoNCE) loss', [('contrastive_loss', 'InfoNCE')],
     'loss', None),
    ('pretrain', 'Pretrain: in-batch accuracy',
     [('contrastive/t2i_accuracy', 'text→image'), ('contrastive/i2t_accuracy', 'image→text')],
     'accuracy', None),
    ('align', 'Align: total loss', [('loss', 'DPO + λ·InfoNCE')], 'loss', None),
    ('align', 'Align: ranked-DPO loss', [('dpo_loss', 'DPO')], 'loss', (math.log(2), 'ln 2')),
    ('align', 'Align: contrastive (InfoNCE) loss', [('contrastive_loss', 'InfoNCE')], 'loss',
     None),
    ('align', 'Align: reward accuracy', [('rewards/accuracies', 'pairs ordered right')],
     'fraction of pairs', (0.5, 'chance')),
    ('align', 'Align: rewards (β · log-ratio vs reference)',
     [('rewards/margins', 'margin'), ('rewards/chosen', 'chosen'),
      ('rewards/rejected', 'rejected')], 'reward', (0.0, None)),
)


def training_curves(path: str, pretrain_jsonl: Optional[str] = None,
                    align_jsonl: Optional[str] = None, *, dpi: int = 100,
                    font_size: float = 9.0) -> str:
  """Loss and reward curves over steps of the pretrain and align stages; writes a PNG.

  Either file may be None (e.g. a run that starts from a Hugging Face checkpoint has no
  pretrain stage), not both. A panel is drawn when its file has its keys; a given file
  with none of the keys its panels plot raises ValueError naming them.
  """
  given = {'pretrain': pretrain_jsonl, 'align': align_jsonl}
  if all(v is None for v in given.values()):
    raise ValueError('training_curves: neither pretrain_jsonl nor align_jsonl given')
  records = {stage: read_metrics_jsonl(p) for stage, p in given.items() if p is not None}
  panels = []
  for stage, recs in records.items():
    specs = [p for p in _PANELS if p[0] == stage]
    present = [p for p in specs if any(key in r for key, _ in p[2] for r in recs)]
    if not present:
      keys = sorted({key for p in specs for key, _ in p[2]})
      raise ValueError(f'training_curves: {given[stage]} has none of the keys {keys}')
    panels += present
  rows = math.ceil(len(panels) / 4)           # at most 4 panels a row, rows filled evenly
  cols = math.ceil(len(panels) / rows)
  fig = Figure(figsize=(3.4 * cols, 2.7 * rows), layout='constrained')
  for n, (stage, title, series, ylabel, ref) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, n + 1)
    for j, (key, label) in enumerate(series):
      pts = [(r['step'], float(r[key])) for r in records[stage] if key in r]
      if pts:
        steps, values = zip(*pts)
        ax.plot(steps, values, marker='o', markersize=3, linewidth=1.4, label=label,
                color=OTHER_COLOURS[j] if j else SYSTEM_COLOURS['PT' if stage == 'pretrain'
                                                                 else 'aligned'])
    if ref is not None:
      ax.axhline(ref[0], color='#777777', linestyle='--', linewidth=0.9, label=ref[1])
    ax.set_title(title, fontsize=font_size + 1)
    ax.set_xlabel('step', fontsize=font_size)
    ax.set_ylabel(ylabel, fontsize=font_size)
    ax.tick_params(labelsize=font_size - 1)
    ax.grid(alpha=0.3)
    if len(series) > 1 or (ref is not None and ref[1]):
      ax.legend(fontsize=font_size - 1, frameon=False)
  return save_png(fig, path, dpi)
