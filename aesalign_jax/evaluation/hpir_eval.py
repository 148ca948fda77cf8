"""HPIR-format benchmarks as an evaluator: a system picks, for each item, the group of images
more similar to the query on average; scored per aspect against the human labels
(aesalign_jax/evaluation/hpir.py holds the format and the scoring)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from absl import logging
from PIL import Image

from aesalign_jax.evaluation import common, hpir
from input_pipeline import images as images_lib


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
  stacked = np.stack(list(pixels.values()))
  if system.across_processes:   # split over the processes (chunks of the embedder's batch)
    embedded = common.embed_chunks(system, len(stacked), 256, lambda rows: stacked[rows])
  else:
    embedded = system.embed_images(stacked)
  emb = dict(zip(pixels, embedded))
  queries = sorted({item.query for item in items})
  q_emb = dict(zip(queries, system.embed_texts(system.query_texts(queries))))
  sims = [(np.stack([emb[str(p)] for p in a]) @ q_emb[item.query],
           np.stack([emb[str(p)] for p in b]) @ q_emb[item.query])
          for item, (a, b) in zip(items, groups)]
  return hpir.score_hpir(items, sims), len(items), len(loaded.items) - len(items)


def hpir_scores(system: common.System, path: str) -> dict:
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
