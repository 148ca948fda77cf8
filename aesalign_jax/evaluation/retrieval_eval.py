"""Image-text retrieval: text-to-image and image-to-text R@k and mean rank, in chunks.

    m = retrieval_metrics(img_emb [N, D], txt_emb [M, D], txt_to_img int [M])
    m['t2i_r1'], m['t2i_r5'], m['t2i_r10'], m['t2i_mean_rank'], m['i2t_r1'], ...

Ground truth: text m describes image txt_to_img[m]. An image may have several texts (COCO's
five captions: repeat the image's row for each, see `flatten_captions`), and one text has one
image.
- text-to-image: the rank of a text's image among all N images;
- image-to-text: the rank of the image's best-placed own caption among all M texts (a hit at k
  when any of its captions is in the top k, the COCO/Flickr convention). Images without any
  text are left out of the image-to-text numbers.

Rank = 1 + the number of wrong candidates scoring above the right one; wrong candidates
within `tie_tol` of it are ties, broken at random, and the metrics are the exact expectations:
R@k = mean P(rank <= k), mean rank = mean (greater + 1 + ties / 2). So a collapsed model (all
scores equal) gets chance, never a perfect score; duplicate captions (common in the embedded
world, where many images share a caption) count as the coin flips they are.

Scale: the [M, N] similarity matrix is never formed. Blocks of text_chunk x image_chunk
scores are computed on device and reduced there to per-text and per-image counts (of scores
above and tying the right one); only those counts come back. Each image chunk is sent to the
device once. With a mesh, each image chunk's rows are split over all its devices. 25k images x
125k captions (COCO-scale x 5) is 4 x 16 blocks at the default chunks.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from aesalign_jax.evaluation import common


def default_config() -> ml_collections.ConfigDict:
  """A retrieval section of config.evals (type 'retrieval')."""
  c = ml_collections.ConfigDict()
  c.type = 'retrieval'
  # 'corpus': the run's evaluation corpus (make_evaluators' `corpus`: each image with its
  # caption; the embedded world's held-out split); 'data': the image-caption source described
  # by `data` (input_pipeline.pipeline's section: folder, JSONL, CSV or a prepared tfds set
  # such as COCO/Flickr30K with data.caption_key set).
  c.source = 'corpus'
  c.data = _data_config()
  # Evaluate on the first max_images images only (0 = all of them).
  c.max_images = 0
  # Images per embedding call.
  c.batch_size = 256
  # Block of the similarity computation: text_chunk x image_chunk float32 scores on device.
  c.text_chunk = 2048
  c.image_chunk = 8192
  # Recall cut-offs reported (R@k for each k).
  c.ks = (1, 5, 10)
  # Scores within this of the right candidate's count as ties (see the module docstring).
  c.tie_tol = 1e-6
  return c


def _data_config() -> ml_collections.ConfigDict:
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.default_config()


@functools.lru_cache(maxsize=16)
def _block_fn(mesh: Optional[Mesh], tie_tol: float):
  """Jitted: one text block x one image block -> counts above / tying the right candidate."""
  def block(txt, txt_img, txt_ok, s_txt, img, img_row0, img_ok, best_img):
    s = jnp.dot(txt, img.T, precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32)                          # [ct, ci]
    rows = img_row0 + jnp.arange(img.shape[0], dtype=jnp.int32)
    # A wrong pair: the text does not describe the image (for t2i a wrong image, for i2t a
    # wrong text); padding rows of either side are never counted.
    wrong = (txt_img[:, None] != rows[None, :]) & txt_ok[:, None] & img_ok[None, :]
    count = lambda m, axis: jnp.sum(wrong & m, axis=axis, dtype=jnp.int32)
    t_greater = count(s > s_txt[:, None] + tie_tol, 1)
    t_ties = count(jnp.abs(s - s_txt[:, None]) <= tie_tol, 1)
    i_greater = count(s > best_img[None, :] + tie_tol, 0)
    i_ties = count(jnp.abs(s - best_img[None, :]) <= tie_tol, 0)
    return t_greater, t_ties, i_greater, i_ties

  if mesh is None:
    return jax.jit(block)
  rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(tuple(mesh.axis_names)))
  # Counts come back replicated (a few ints per row), so every process can read them.
  return jax.jit(block, in_shardings=(rep, rep, rep, rep, rows, rep, rows, rows),
                 out_shardings=(rep, rep, rep, rep))


def _put(x: np.ndarray, *, mesh: Optional[Mesh], spec: P):
  """A host array (the same on every process) onto the mesh with `spec`; each process
  supplies its own devices' slices, so this works on a multi-host mesh too."""
  if mesh is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def _padded(x: np.ndarray, size: int, fill=0) -> np.ndarray:
  if len(x) == size:
    return x
  pad = np.full((size - len(x),) + x.shape[1:], fill, x.dtype)
  return np.concatenate([x, pad])


def retrieval_metrics(img_emb, txt_emb, txt_to_img, *, text_chunk: int = 2048,
                      image_chunk: int = 8192, ks: Sequence[int] = (1, 5, 10),
                      tie_tol: float = 1e-6, mesh: Optional[Mesh] = None) -> dict[str, float]:
  """Text-to-image and image-to-text recall@k and mean rank (see the module docstring).

  Args:
    img_emb: [N, D] image embeddings (unit vectors: scores are inner products).
    txt_emb: [M, D] text embeddings.
    txt_to_img: int [M], the image row each text describes.
    text_chunk, image_chunk: block size of the on-device similarity computation.
    ks: recall cut-offs.
    tie_tol: scores within this of the right candidate's are ties, broken at random.
    mesh: split each image chunk's rows over this mesh's devices; None = default device.

  Returns:
    {'t2i_r{k}', 't2i_mean_rank', 'i2t_r{k}', 'i2t_mean_rank', 'num_images', 'num_texts',
     'num_images_with_text'}; recalls in [0, 1], ranks from 1.
  """
  img = np.asarray(img_emb, np.float32)
  txt = np.asarray(txt_emb, np.float32)
  gt = np.asarray(txt_to_img)
  if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
    raise ValueError(f'retrieval_metrics: image embeddings {img.shape} and text embeddings '
                     f'{txt.shape} must be [N, D] and [M, D] with the same D')
  n, m = len(img), len(txt)
  if gt.shape != (m,) or not np.issubdtype(gt.dtype, np.integer):
    raise ValueError(f'retrieval_metrics: txt_to_img must be int [{m}], got {gt.dtype} '
                     f'{gt.shape}')
  if n == 0 or m == 0:
    raise ValueError(f'retrieval_metrics: empty set ({n} images, {m} texts)')
  if gt.min() < 0 or gt.max() >= n:
    bad = int(np.flatnonzero((gt < 0) | (gt >= n))[0])
    raise ValueError(f'retrieval_metrics: text {bad} points at image {gt[bad]}, outside '
                     f'[0, {n})')
  gt = gt.astype(np.int32)

  ndev = 1 if mesh is None else mesh.size
  ct = max(1, min(int(text_chunk), m))
  ci = -(-max(1, min(int(image_chunk), n)) // ndev) * ndev   # a multiple of the devices
  # The score of each text with its own image, and each image's best own caption, computed
  # once here in float64. The blocks compare every wrong pair's score against them; the right
  # pair itself is masked out by index, never compared with its own (rounded) score.
  s_txt = np.einsum('md,md->m', txt.astype(np.float64), img[gt].astype(np.float64))
  s_txt = s_txt.astype(np.float32)
  best_img = np.full(n, -np.inf, np.float32)
  np.maximum.at(best_img, gt, s_txt)
  has_text = np.zeros(n, bool)
  has_text[gt] = True

  put_rep = functools.partial(_put, mesh=mesh, spec=P())
  put_rows = functools.partial(_put, mesh=mesh, spec=P(tuple(mesh.axis_names)) if mesh else P())
  text_blocks = []
  for start in range(0, m, ct):
    sl = slice(start, start + ct)
    text_blocks.append(tuple(put_rep(a) for a in (
        _padded(txt[sl], ct), _padded(gt[sl], ct, -1),
        _padded(np.ones(len(gt[sl]), bool), ct, False), _padded(s_txt[sl], ct))))

  block = _block_fn(mesh, float(tie_tol))
  # Counts accumulate on device (int32: at most N or M per row), fetched once at the end, so
  # the host never waits on a block while the next ones are dispatched.
  t_acc = [None] * len(text_blocks)
  i_acc = []
  for istart in range(0, n, ci):
    isl = slice(istart, istart + ci)
    live = len(img[isl])
    img_block = put_rows(_padded(img[isl], ci))
    img_ok = put_rows(_padded(np.ones(live, bool), ci, False))
    best_block = put_rows(_padded(best_img[isl], ci))
    i_sum = None
    for j, (tb, tgt, tok, tst) in enumerate(text_blocks):
      out = block(tb, tgt, tok, tst, img_block, np.int32(istart), img_ok, best_block)
      t_acc[j] = out[:2] if t_acc[j] is None else (t_acc[j][0] + out[0], t_acc[j][1] + out[1])
      i_sum = out[2:] if i_sum is None else (i_sum[0] + out[2], i_sum[1] + out[3])
    i_acc.append((i_sum, live))
  t_greater = np.concatenate([np.asarray(g) for g, _ in t_acc])[:m].astype(np.int64)
  t_ties = np.concatenate([np.asarray(t) for _, t in t_acc])[:m].astype(np.int64)
  i_greater = np.concatenate([np.asarray(g)[:live] for (g, _), live in i_acc]).astype(np.int64)
  i_ties = np.concatenate([np.asarray(t)[:live] for (_, t), live in i_acc]).astype(np.int64)

  out: dict[str, float] = {}
  for prefix, greater, ties in (('t2i', t_greater, t_ties),
                                ('i2t', i_greater[has_text], i_ties[has_text])):
    for k in ks:
      out[f'{prefix}_r{k}'] = float(common.expected_hit(greater, ties, k).mean())
    out[f'{prefix}_mean_rank'] = float(np.mean(greater + 1 + ties / 2))
  out.update(num_images=float(n), num_texts=float(m), num_images_with_text=float(has_text.sum()))
  return out


def flatten_captions(captions_per_image: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
  """[[c00, c01, ...], [c10, ...], ...] -> (flat texts, txt_to_img int [M])."""
  texts, owner = [], []
  for i, caps in enumerate(captions_per_image):
    caps = [caps] if isinstance(caps, str) else list(caps)
    texts += [str(c) for c in caps]
    owner += [i] * len(caps)
  return texts, np.asarray(owner, np.int64)


def evaluate_batches(system: common.System, batches: Iterable, *,
                     max_images: int = 0, **metric_kwargs) -> dict[str, float]:
  """Embeds an image-text set given as batches and returns retrieval_metrics.

  Each batch is a dict with 'image' (uint8 [B, S, S, 3]) and either 'caption' ([B] strings,
  one per image) or 'captions' (B lists of strings, several per image), e.g. the batches of
  input_pipeline.pipeline.make_pipeline(..., num_epochs=1, shuffle=False).
  """
  img_parts, caps = [], []
  seen = 0
  for batch in batches:
    images = np.asarray(batch['image'])
    texts = batch['captions'] if 'captions' in batch else batch['caption']
    if max_images:
      images, texts = images[:max_images - seen], texts[:max_images - seen]
    img_parts.append(system.embed_images(images))
    caps += [[str(t)] if isinstance(t, (str, np.str_)) else [str(x) for x in t] for t in texts]
    seen += len(images)
    if max_images and seen >= max_images:
      break
  if not img_parts:
    raise ValueError(f'retrieval ({system.name}): the image-text source yielded no batch')
  texts, owner = flatten_captions(caps)
  return retrieval_metrics(np.concatenate(img_parts), system.embed_texts(texts), owner,
                           **metric_kwargs)


@common.register('retrieval')
class RetrievalEvaluator(common.Evaluator):
  """R@k and mean rank both ways on the run's corpus or a data source (config: module's
  default_config). Context: `corpus` for source='corpus'; `mesh` optional."""

  def _metric_kwargs(self) -> dict:
    c = self.config
    return dict(text_chunk=c.text_chunk, image_chunk=c.image_chunk, ks=tuple(c.ks),
                tie_tol=c.tie_tol, mesh=self.context.get('mesh'))

  def run(self, system: common.System) -> dict[str, float]:
    c = self.config
    if c.source == 'corpus':
      return self._run_corpus(system)
    if c.source == 'data':
      return evaluate_batches(system, self._data_batches(), max_images=c.max_images,
                              **self._metric_kwargs())
    raise ValueError(f"evals.{self.name}.source={c.source!r}: expected 'corpus' or 'data'")

  def _run_corpus(self, system: common.System) -> dict[str, float]:
    """Each image of the corpus with its caption (an evaluation corpus holds images that load:
    the corpus index leaves out the others)."""
    c, corpus = self.config, self.need('corpus')
    n = min(len(corpus), c.max_images) if c.max_images else len(corpus)
    # Embedded once per system and corpus (the key other evaluators of the corpus use).
    key = corpus.name if n == len(corpus) else f'{corpus.name}:{n}'
    img = self.cache.get(system, key, lambda: common.embed_chunks(
        system, n, c.batch_size, lambda rows: corpus.images(rows)[0]))
    txt = system.embed_texts(corpus.captions(np.arange(n)))
    return retrieval_metrics(img, txt, np.arange(n), **self._metric_kwargs())

  def _data_batches(self):
    from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    d = self.config.data
    # Every process reads the whole set once, in order: the metrics need all of it, and it is
    # small.
    return pipeline.make_pipeline(
        pipeline.make_source(d), batch_size=self.config.batch_size, seed=0, num_epochs=1,
        shuffle=False, drop_remainder=False, shard_index=0, shard_count=1,
        **pipeline.pipeline_kwargs(d))
