"""What every report figure shares: a fixed colour per system, and writing a figure as a PNG
(matplotlib's object API on the Agg canvas: no pyplot, no GUI, no global state)."""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Fixed colours per system, so a system looks the same in every figure.
SYSTEM_COLOURS = {'PT': '#1f77b4', 'PT+rephrase': '#ff7f0e', 'aligned': '#2ca02c'}
OTHER_COLOURS = ('#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf')


def system_colour(name: str, j: int) -> str:
  """The colour of system `name`, the j-th drawn (a fixed one for the known systems)."""
  return SYSTEM_COLOURS.get(name, OTHER_COLOURS[j % len(OTHER_COLOURS)])


def save_png(fig: Figure, path: str, dpi: int) -> str:
  """Writes `fig` to the PNG `path` (folders are created) on a white background; returns path."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=dpi, facecolor='white')
  return path
