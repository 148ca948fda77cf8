"""The trade-off figure: each system as a labelled point (recall, top-k aesthetic), with
arrows from a baseline."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aesalign_jax.evaluation.figures_style import save_png, system_colour


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
      ax.scatter([x], [y], s=90, facecolors='none', edgecolors=system_colour(name, j), linewidths=2,
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
  colours = {n: '#555555' if extra else system_colour(n, j)
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
  return save_png(fig, path, dpi)


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
