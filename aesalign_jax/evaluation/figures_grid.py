"""The retrieval grid figure: per query, each system's top-k images with captions, on-topic
frames and notes; grid_inputs builds its arguments from report['topk']."""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath

from aesalign_jax.evaluation.figures_style import save_png, system_colour

_TEXT_TO_PATH = TextToPath()   # measures text widths (no figure needed)
ON_TOPIC, OFF_TOPIC = '#1a9641', '#d7191c'    # frame colours (the caption also says ✓ / ✗)
# Scorers shown under each grid image: (report name, short label, what it is), in order.
GRID_SCORERS = (('ground_truth', 'gt', "the world's ground-truth aesthetic"),
                ('iap', 'iap', 'the IAP aesthetic predictor'),
                ('lowlevel', 'low', 'low-level image quality'))


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
               color=system_colour(system, si))
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
  return save_png(fig, path, dpi)


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
