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

import json
import math
import os
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath

# Fixed colours per system, so a system looks the same in every figure.
SYSTEM_COLOURS = {'PT': '#1f77b4', 'PT+rephrase': '#ff7f0e', 'aligned': '#2ca02c'}
_OTHER_COLOURS = ('#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf')
_TEXT_TO_PATH = TextToPath()   # measures text widths (no figure needed)
ON_TOPIC, OFF_TOPIC = '#1a9641', '#d7191c'    # frame colours (the caption also says ✓ / ✗)
# Scorers shown under each grid image: (report name, short label, what it is), in order.
GRID_SCORERS = (('ground_truth', 'gt', "the world's ground-truth aesthetic"),
                ('iap', 'iap', 'the IAP aesthetic predictor'),
                ('lowlevel', 'low', 'low-level image quality'))


def _colour(name: str, j: int) -> str:
  return SYSTEM_COLOURS.get(name, _OTHER_COLOURS[j % len(_OTHER_COLOURS)])


def _save(fig: Figure, path: str, dpi: int) -> str:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=dpi, facecolor='white')
  return path


def _wrap(text: str, width_in: float, font_size: float, max_lines: int) -> str:
  """`text` wrapped to lines at most width_in inches wide in DejaVu Sans at font_size (its
  own line breaks kept), at most max_lines lines (an ellipsis ends a cut text)."""
  prop = FontProperties(size=font_size)

  def fits(s: str) -> bool:
    return _TEXT_TO_PATH.get_text_width_height_descent(s, prop, ismath=False)[0] <= width_in * 72

  lines = []
  for para in text.split('\n'):
    line = ''
    for word in para.split():
      trial = f'{line} {word}' if line else word
      if fits(trial) or not line:
        line = trial
      else:
        lines.append(line)
        line = word
    lines.append(line)
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    while lines[-1] and not fits(lines[-1] + '…'):
      lines[-1] = lines[-1][:-1]
    lines[-1] = lines[-1].rstrip(' ,') + '…'
  return '\n'.join(lines)


def _upscale(image: np.ndarray, px: int) -> np.ndarray:
  """Nearest-neighbour upscale by the largest integer factor that keeps the side <= px."""
  factor = max(1, px // max(image.shape[0], image.shape[1]))
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


# Retrieval grids.

def retrieval_grid(path: str, queries: Sequence[str],
                   images: Mapping[str, Sequence[np.ndarray]],
                   captions: Mapping[str, Sequence[Sequence[str]]], *,
                   relevant: Optional[Mapping[str, Sequence[Sequence[bool]]]] = None,
                   notes: Optional[Mapping[str, Sequence[str]]] = None,
                   title: str = 'Top-k retrieved images per system (held-out queries)',
                   subtitle: str = ('Left to right: rank 1 to k. Frame and mark: green ✓ '
                                    'on-topic for the query, red ✗ off-topic.'),
                   image_px: int = 96, dpi: int = 100, font_size: float = 8.0,
                   label_width_in: float = 2.1) -> str:
  """One block per query, one row per system, its top-k images best first; writes a PNG.

  Args:
    path: the PNG to write (folders are created).
    queries: Q query strings (block titles).
    images: system name -> Q uint8 arrays [K, H, W, 3] (the system's top K for each query,
      best first); rows are drawn in this mapping's order. K may differ between rows.
    captions: system name -> Q lists of K strings, one under each image ('\\n' for lines).
    relevant: system name -> Q lists of K bools: a green frame (on-topic) or a red one.
    notes: system name -> Q strings shown under the system name (e.g. the rephrased query,
      the row's mean score); wrapped and shortened to the label column.
    title, subtitle: the lines above the grid (subtitle: what marks and captions mean).
    image_px: side of each image on the page (upscaled nearest-neighbour from H, W).
    dpi, font_size: output resolution and the size of all small text in points.
  Returns: path.
  """
  queries = [str(q) for q in queries]
  if not queries:
    raise ValueError('retrieval_grid: no queries')
  if not images:
    raise ValueError('retrieval_grid: no systems in images')
  systems = list(images)
  k_max = _check_grid(queries, images, captions, relevant, notes)

  # Layout in inches, top to bottom; fonts in points (1 pt = 1/72 in).
  line = font_size * 1.3 / 72
  img = image_px / dpi
  gap, margin, block_gap = 0.08, 0.15, 0.22
  cap_lines = max(str(c).count('\n') + 1 for s in systems for row in captions[s] for c in row)
  row_h = img + cap_lines * line + 0.12
  head_h = (font_size + 2) * 2.0 / 72
  top_h = (font_size + 3) * 1.6 / 72 + line * 2.6
  block_h = head_h + len(systems) * row_h
  width = 2 * margin + label_width_in + k_max * img + (k_max - 1) * gap
  height = margin + top_h + len(queries) * block_h + (len(queries) - 1) * block_gap + margin
  fig = Figure(figsize=(width, height))
  fx = lambda x: x / width
  fy = lambda y: 1 - y / height        # y measured down from the top edge
  x_img = margin + label_width_in

  fig.text(fx(margin), fy(margin), title, fontsize=font_size + 3, weight='bold', va='top')
  fig.text(fx(margin), fy(margin + (font_size + 3) * 1.6 / 72),
           _wrap(subtitle, width - 2 * margin, font_size, 2), fontsize=font_size, va='top',
           color='#333333', linespacing=1.15)
  y = margin + top_h
  for qi, query in enumerate(queries):
    fig.text(fx(margin), fy(y + 0.03), f'Query {qi + 1}: “{query}”', fontsize=font_size + 2,
             weight='bold', va='top')
    y += head_h
    for si, system in enumerate(systems):
      fig.text(fx(margin), fy(y), system, fontsize=font_size + 1, weight='bold', va='top',
               color=_colour(system, si))
      if notes is not None and notes[system][qi]:
        max_lines = max(1, int((row_h - line * 1.3) / line))
        note = _wrap(str(notes[system][qi]), label_width_in - 0.15, font_size, max_lines)
        fig.text(fx(margin), fy(y + line * 1.3), note, fontsize=font_size, va='top',
                 color='#333333', linespacing=1.15)
      for j, image in enumerate(images[system][qi]):
        left = x_img + j * (img + gap)
        ax = fig.add_axes((fx(left), fy(y + img), img / width, img / height))
        ax.imshow(_upscale(np.asarray(image), image_px), interpolation='nearest')
        ax.set_xticks([])
        ax.set_yticks([])
        frame, lw = '#999999', 0.8
        if relevant is not None:
          frame, lw = (ON_TOPIC if relevant[system][qi][j] else OFF_TOPIC), 2.5
        for spine in ax.spines.values():
          spine.set_color(frame)
          spine.set_linewidth(lw)
        fig.text(fx(left + img / 2), fy(y + img + 0.03), str(captions[system][qi][j]),
                 fontsize=font_size, ha='center', va='top', linespacing=1.15)
      y += row_h
    y += block_gap
  return _save(fig, path, dpi)


def _check_grid(queries, images, captions, relevant, notes) -> int:
  """Raises ValueError naming what is missing or malformed; returns the largest K."""
  q = len(queries)
  k_max = 0
  for what, table in (('captions', captions), ('relevant', relevant), ('notes', notes)):
    if table is None:
      continue
    missing = [s for s in images if s not in table]
    if missing:
      raise ValueError(f'retrieval_grid: {what} has no entry for system(s) {missing}')
  for system, rows in images.items():
    for what, table in (('images', images), ('captions', captions), ('relevant', relevant),
                        ('notes', notes)):
      if table is not None and len(table[system]) != q:
        raise ValueError(f'retrieval_grid: {what}[{system!r}] has {len(table[system])} rows '
                         f'for {q} queries')
    for qi, row in enumerate(rows):
      row = np.asarray(row)
      where = f'system {system!r}, query {qi} ({queries[qi]!r})'
      if row.ndim != 4 or row.shape[-1] != 3 or row.dtype != np.uint8 or not len(row):
        raise ValueError(f'retrieval_grid: images for {where} must be uint8 [K, H, W, 3] with '
                         f'K >= 1, got {row.dtype} {row.shape}')
      for what, table in (('captions', captions), ('relevant', relevant)):
        if table is not None and len(table[system][qi]) != len(row):
          raise ValueError(f'retrieval_grid: {what} for {where} has '
                           f'{len(table[system][qi])} entries for {len(row)} images')
      k_max = max(k_max, len(row))
  return k_max


def _query_note(query: str, text: str) -> str:
  """What a system searched with, when it differs from the query: the added words only when
  the rephrasing extends the query (the lexicon styles do), else the whole text."""
  if text == query:
    return ''
  if text.startswith(query):
    return 'searched: “… ' + text[len(query):].lstrip(' ,;') + '”'
  return f'searched: “{text}”'


def grid_inputs(topk: Mapping[str, Mapping], load_images: Callable[[np.ndarray], np.ndarray], *,
                query_indices: Sequence[int], k: int = 6, key: str = 'ids',
                scorers: Sequence[tuple[str, str, str]] = GRID_SCORERS) -> dict:
  """retrieval_grid's keyword arguments from report['topk'] (TopK.to_json per system).

  load_images: corpus ids -> uint8 [N, H, W, 3] (key 'ids', e.g. world.render_batch) or
  corpus rows -> images (key 'rows', e.g. the evaluator's corpus loader).
  query_indices: which queries (positions in the systems' common query list).
  scorers: (report scorer name, label, description); the first two present are shown under
  each image (and explained in the subtitle).
  Each row's note: its mean first score over the k shown, its on-topic count and, if the
  system rephrased, what it searched with.
  """
  if not topk:
    raise ValueError('grid_inputs: no systems in topk')
  systems = list(topk)
  queries = list(topk[systems[0]]['queries'])
  for system in systems:
    t = topk[system]
    if key not in t:
      raise ValueError(f"grid_inputs: topk[{system!r}] has no {key!r} (keys: {sorted(t)})")
    if list(t['queries']) != queries:
      raise ValueError(f'grid_inputs: topk[{system!r}] has other queries than '
                       f'topk[{systems[0]!r}]')
  bad = [i for i in query_indices if not 0 <= i < len(queries)]
  if bad:
    raise ValueError(f'grid_inputs: query indices {bad} out of range [0, {len(queries)})')
  shown = [(name, label, about) for name, label, about in scorers
           if all(name in topk[s].get('aesthetic', {}) for s in systems)][:2]
  have_relevance = all('relevant' in topk[s] for s in systems)
  subtitle = ['Left to right: rank 1 to k.']
  if have_relevance:
    subtitle.append('Frame and mark: green ✓ on-topic for the query, red ✗ off-topic.')
  if shown:
    subtitle.append('Scores: ' + ', '.join(f'{label} = {about}' for _, label, about in shown)
                    + ' (higher = better).')
  out = dict(queries=[queries[i] for i in query_indices], images={}, captions={}, notes={},
             subtitle=' '.join(subtitle))
  if have_relevance:
    out['relevant'] = {}
  for system in systems:
    t = topk[system]
    ids = np.asarray([t[key][i][:k] for i in query_indices], np.int64)
    pics = np.asarray(load_images(ids.reshape(-1)))
    out['images'][system] = list(pics.reshape(ids.shape + pics.shape[1:]))
    caps, notes, rel = [], [], []
    for i in query_indices:
      scores = [np.asarray(t['aesthetic'][name][i][:k], float) for name, _, _ in shown]
      hits = [bool(h) for h in t['relevant'][i][:k]] if have_relevance else None
      lines = [[f'{label} {s[j]:.2f}' for (_, label, _), s in zip(shown, scores)]
               for j in range(ids.shape[1])]
      if hits is not None:
        lines = [[ln[0] + (' ✓' if h else ' ✗')] + ln[1:] if ln else ['✓' if h else '✗']
                 for ln, h in zip(lines, hits)]
      caps.append(['\n'.join(ln) for ln in lines])
      note = []
      if shown:
        note.append(f'top {ids.shape[1]}: mean {shown[0][1]} {scores[0].mean():.3f}')
      if hits is not None:
        note.append(f'{sum(hits)}/{len(hits)} on-topic')
      note.append(_query_note(queries[i], str(t.get('query_texts', queries)[i])))
      notes.append('\n'.join(n for n in note if n))
      rel.append(hits)
    out['captions'][system] = caps
    out['notes'][system] = notes
    if have_relevance:
      out['relevant'][system] = rel
  return out


# Training curves.

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
                color=_OTHER_COLOURS[j] if j else SYSTEM_COLOURS['PT' if stage == 'pretrain'
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
  return _save(fig, path, dpi)


# Trade-off.

def tradeoff_points(metrics: Mapping[str, Mapping[str, float]], *,
                    recall_key: str = 'retrieval/t2i_r10',
                    aesthetic_key: str = 'topk_quality/aesthetic/ground_truth'
                    ) -> dict[str, tuple[float, float]]:
  """(recall, aesthetic) per system from report['metrics']; ValueError naming a missing key."""
  out = {}
  for system, m in metrics.items():
    missing = [k for k in (recall_key, aesthetic_key) if k not in m]
    if missing:
      raise ValueError(f'tradeoff_points: metrics[{system!r}] lacks {missing}')
    out[system] = (float(m[recall_key]), float(m[aesthetic_key]))
  return out


def tradeoff(path: str, points: Mapping[str, Sequence[float]], *,
             extra_points: Optional[Mapping[str, Sequence[float]]] = None,
             baseline: Optional[str] = None,
             recall_label: str = 'text-to-image R@10',
             aesthetic_label: str = 'mean ground-truth aesthetic of the top 10',
             title: str = 'Recall vs top-k aesthetics', dpi: int = 100,
             font_size: float = 9.0) -> str:
  """Each system as a point (recall, aesthetic), labelled; writes a PNG.

  points: system name -> (recall, aesthetic). extra_points: more labelled points drawn
  smaller and grey (e.g. align runs at other lambda). baseline: a system of `points` from
  which an arrow goes to every other system (what rephrasing or alignment changed); the
  legend gives each point's difference from it.
  """
  if not points:
    raise ValueError('tradeoff: no points')
  every = {**{n: (p, False) for n, p in points.items()},
           **{n: (p, True) for n, p in (extra_points or {}).items()}}
  xy = {}
  for name, (p, _) in every.items():
    p = tuple(float(v) for v in p)
    if len(p) != 2 or not all(math.isfinite(v) for v in p):
      raise ValueError(f'tradeoff: point {name!r} must be two finite numbers '
                       f'(recall, aesthetic), got {p}')
    xy[name] = p
  if baseline is not None and baseline not in points:
    raise ValueError(f'tradeoff: baseline {baseline!r} is not among the points {list(points)}')

  fig = Figure(figsize=(6.4, 4.8), layout='constrained')
  ax = fig.add_subplot()
  markers = 'osD^vP*X'
  for j, (name, (_, extra)) in enumerate(every.items()):
    x, y = xy[name]
    label = f'{name}  ({x:.3f}, {y:.3f})'
    if baseline is not None and name != baseline:
      bx, by = xy[baseline]
      label += f'  Δ {x - bx:+.3f}, {y - by:+.3f}'
    if extra:
      ax.scatter([x], [y], s=30, color='#888888', marker='o', zorder=2, label=label)
    else:
      # Hollow, distinct markers: points that coincide (PT and PT+rephrase share a recall
      # when rephrasing leaves captions alone) stay visible.
      ax.scatter([x], [y], s=90, facecolors='none', edgecolors=_colour(name, j), linewidths=2,
                 marker=markers[j % len(markers)], zorder=3, label=label)
  if baseline is not None:
    for name in points:
      if name != baseline and xy[name] != xy[baseline]:
        ax.annotate('', xy=xy[name], xytext=xy[baseline], zorder=1,
                    arrowprops=dict(arrowstyle='->', color='#aaaaaa', linewidth=1,
                                    shrinkA=6, shrinkB=6))
  xs, ys = zip(*xy.values())
  _pad_limits(ax.set_xlim, xs)
  _pad_limits(ax.set_ylim, ys)
  colours = {n: '#555555' if extra else _colour(n, j)
             for j, (n, (_, extra)) in enumerate(every.items())}
  _place_labels(fig, ax, xy, colours, font_size)
  ax.set_xlabel(recall_label, fontsize=font_size)
  ax.set_ylabel(aesthetic_label, fontsize=font_size)
  ax.set_title(title, fontsize=font_size + 2)
  ax.tick_params(labelsize=font_size - 1)
  ax.grid(alpha=0.3)
  legend_title = 'system (recall, aesthetic)' + (f'  Δ vs {baseline}' if baseline else '')
  ax.legend(fontsize=font_size - 1, loc='best', title=legend_title,
            title_fontsize=font_size - 1)
  return _save(fig, path, dpi)


def _pad_limits(set_lim, values, frac: float = 0.35, floor: float = 0.01):
  lo, hi = min(values), max(values)
  pad = max((hi - lo) * frac, floor)
  set_lim(lo - pad, hi + pad)


def _place_labels(fig: Figure, ax, xy: Mapping[str, tuple[float, float]],
                  colours: Mapping[str, str], font_size: float):
  """Labels each point with its name in its colour, trying offsets until it overlaps no label
  placed yet and no other point (a greedy search, higher points first so that of two close
  points the higher gets the higher label)."""
  renderer = FigureCanvasAgg(fig).get_renderer()
  fig.draw_without_rendering()   # settle the constrained layout before measuring
  point_px = {n: ax.transData.transform(p) for n, p in xy.items()}
  boxes = []
  offsets = [(8, 6, 'left', 'bottom'), (8, -6, 'left', 'top'), (-8, 6, 'right', 'bottom'),
             (-8, -6, 'right', 'top'), (0, 12, 'center', 'bottom'), (0, -12, 'center', 'top'),
             (14, 18, 'left', 'bottom'), (14, -18, 'left', 'top')]
  for name, p in sorted(xy.items(), key=lambda item: -item[1][1]):
    placed = None
    for dx, dy, ha, va in offsets:
      text = ax.annotate(name, p, xytext=(dx, dy), textcoords='offset points', ha=ha, va=va,
                         fontsize=font_size, zorder=4, color=colours[name])
      box = text.get_window_extent(renderer).expanded(1.05, 1.1)
      clash = any(box.overlaps(b) for b in boxes) or any(
          box.contains(*q) for other, q in point_px.items() if other != name)
      if not clash:
        placed = box
        break
      text.remove()
    if placed is None:      # nowhere free: keep the first offset
      text = ax.annotate(name, p, xytext=offsets[0][:2], textcoords='offset points',
                         fontsize=font_size, zorder=4, color=colours[name])
      placed = text.get_window_extent(renderer)
    boxes.append(placed)


# Everything for the report.

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
