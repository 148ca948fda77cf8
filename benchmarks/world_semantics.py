"""Why the default run's PT model may not see shape: three diagnostics on the embedded world.

  python -m benchmarks.world_semantics [--workdir W] [--quick] [--out FILE.json]

1. label_probe: the default tiny vision tower (config.model, 32 px, 8 px patches) trained on
   the shape and the colour LABELS of one-object training images (AdamW, batch 128, linear
   warmup then cosine, a linear head on the unit embeddings at a fixed scale of 10), at each
   learning rate: held-out top-1 at checkpoints. Can the tower learn shape at all, at which
   rate, and how fast compared with colour?
2. separation (needs a pretrained model: W/pretrain/model): per attribute (shape, colour), the
   mean cosine between the text embeddings of 'a <colour> <shape>' captions that differ only
   in that attribute; a linear probe (ridge regression, closed form, half the images to fit,
   half to test) reading the attribute from the image embeddings of held-out one-object
   images; and zero-shot shape given the right colour (six 'a <true colour> <shape>' prompts).
3. batch_negatives: in random batches of 128 training images, the fraction of one-object
   images with an in-batch negative that differs only in shape (same colour, size and
   pattern), or that shares the colour with a different shape: how often the contrastive loss
   needs shape at all.
4. nuisance_probe: label_probe for shape on the world as it is, on 'clean' images (the same
   scenes re-rendered sharp, noise-free, well exposed and without clutter strokes), on
   'plain' ones (only the plain-background images) and on both: which of the world's
   nuisances (pattern edges, blur/noise/exposure/strokes) make shape slow to learn.

Held-out images are the world's eval split: nothing here is tuned on them (the report reads the
same split; these numbers explain it, they choose nothing). To compare settings, `validation`
(--validation) scores a PT model on training-split data only: zero-shot shape and colour on
the one-object images among the last 3,000 training images, and the top-10 precision (and
ground-truth aesthetic) of the mining queries over the mining corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aesalign_jax import embed, models
from aesalign_jax.models import clip, hf
from aesalign_jax.tokenizer import ClipTokenizer
from aesalign_jax.train import normalize_on_device
from configs import default
from input_pipeline import world as world_lib
from input_pipeline import world_scene

ATTRIBUTES = {'shape': world_scene.SHAPES, 'colour': world_scene.COLOURS}


def one_object(world, indices: np.ndarray) -> tuple[np.ndarray, dict]:
  """The one-object images among `indices` and their subject's attributes."""
  scene = world.scene(indices)
  keep = scene.num_objects == 1
  return indices[keep], {'shape': scene.shape[keep, 0], 'colour': scene.colour[keep, 0],
                         'size': scene.size[keep, 0], 'pattern': scene.pattern[keep]}


# Factor overrides that remove the pixel nuisances: sharp, noise-free, exposed, no strokes.
CLEAN = {'sharpness': 1.0, 'noise': 1.0, 'exposure': 1.0, 'clutter': 1.0}
NUISANCES = ('world', 'clean', 'plain', 'clean_plain')


def _only_plain(idx, attr):
  keep = attr['pattern'] == world_scene.PATTERNS.index('plain')
  return idx[keep], {k: v[keep] for k, v in attr.items()}


def label_probe(world, cfg, *, attribute: str, lr: float, steps: int, batch: int = 128,
                eval_images: int = 2000, every: int = 100, seed: int = 0,
                nuisance: str = 'world') -> dict:
  """Held-out top-1 of the vision tower trained on one attribute's labels (see module doc);
  `nuisance` (NUISANCES) removes some of the world's nuisances from training and test."""
  if nuisance not in NUISANCES:
    raise ValueError(f'nuisance={nuisance!r}: expected one of {NUISANCES}')
  overrides = CLEAN if 'clean' in nuisance else None
  classes = len(ATTRIBUTES[attribute])
  train_idx, train_attr = one_object(world, world.split_indices('train')[:60_000])
  eval_idx, eval_attr = one_object(world, world.split_indices('eval'))
  if 'plain' in nuisance:
    (train_idx, train_attr), (eval_idx, eval_attr) = (_only_plain(train_idx, train_attr),
                                                      _only_plain(eval_idx, eval_attr))
  eval_idx, eval_labels = eval_idx[:eval_images], eval_attr[attribute][:eval_images]
  eval_pixels = world.render_batch(eval_idx, overrides)
  params = {'clip': clip.init_params(cfg, seed),
            'head': jnp.asarray(np.random.default_rng(seed).normal(
                0, cfg.embed_dim ** -0.5, (cfg.embed_dim, classes)), jnp.float32)}
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 10 + 1), steps)
  optimizer = optax.adamw(schedule, weight_decay=0.1)
  opt_state = optimizer.init(params)

  def logits(p, images):
    emb = clip.bind(cfg, p['clip']).encode_image(normalize_on_device(images))
    return 10.0 * emb @ p['head']

  @jax.jit
  def step(p, s, images, labels):
    loss, grads = jax.value_and_grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
        logits(q, images), labels).mean())(p)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  predict = jax.jit(lambda p, images: jnp.argmax(logits(p, images), -1))

  def accuracy(p):
    hits = [np.asarray(predict(p, eval_pixels[s:s + 500])) == eval_labels[s:s + 500]
            for s in range(0, len(eval_idx), 500)]
    return float(np.concatenate(hits).mean())

  rng = np.random.default_rng(seed)
  curve, losses, start = [], [], time.time()
  for i in range(1, steps + 1):
    pick = rng.integers(0, len(train_idx), batch)
    params, opt_state, loss = step(params, opt_state,
                                   world.render_batch(train_idx[pick], overrides),
                                   train_attr[attribute][pick])
    losses.append(float(loss))
    if i % every == 0 or i == steps:
      curve.append({'step': i, 'accuracy': accuracy(params),
                    'loss': float(np.mean(losses[-every:]))})
  return {'attribute': attribute, 'lr': lr, 'steps': steps, 'batch': batch,
          'nuisance': nuisance, 'vision_stem': cfg.vision_stem,
          'chance': 1.0 / classes, 'eval_images': len(eval_idx), 'curve': curve,
          'seconds': round(time.time() - start, 1)}


def ridge_probe(features: np.ndarray, labels: np.ndarray, classes: int,
                reg: float = 1e-2) -> float:
  """Top-1 of a ridge regression to one-hot labels, fit on the first half, tested on the rest."""
  x = np.concatenate([features, np.ones((len(features), 1))], 1).astype(np.float64)
  y = np.eye(classes)[labels]
  half = len(x) // 2
  a, b = x[:half], y[:half]
  w = np.linalg.solve(a.T @ a + reg * np.eye(a.shape[1]), a.T @ b)
  return float(np.mean(np.argmax(x[half:] @ w, 1) == labels[half:]))


def separation(world, model_folder: str, eval_images: int = 2000) -> dict:
  """How well the PT model's towers tell shapes and colours apart (see module doc)."""
  cfg, params = hf.load_hf_folder(model_folder)
  embedder = embed.Embedder(cfg, params, ClipTokenizer.from_folder(model_folder))
  shapes, colours = world_scene.SHAPES, world_scene.COLOURS
  texts = [f'a {c} {s}' for c in colours for s in shapes]
  t = embedder.texts(texts).reshape(len(colours), len(shapes), -1)
  cos = np.einsum('csd,ked->cske', t, t)
  same_colour = np.mean([cos[c, s, c, z] for c in range(len(colours))
                         for s in range(len(shapes)) for z in range(len(shapes)) if s != z])
  same_shape = np.mean([cos[c, s, k, s] for c in range(len(colours)) for k in range(len(colours))
                        for s in range(len(shapes)) if c != k])
  idx, attr = one_object(world, world.split_indices('eval'))
  idx = idx[:eval_images]
  img = embedder.images(world.render_batch(idx))
  out = {'text_cosine_differ_only_in_shape': float(same_colour),
         'text_cosine_differ_only_in_colour': float(same_shape), 'images': len(idx)}
  for name, values in ATTRIBUTES.items():
    out[f'image_probe_{name}'] = ridge_probe(img, attr[name][:len(idx)], len(values))
  colour = attr['colour'][:len(idx)]
  scores = np.einsum('nd,nsd->ns', img, t[colour])   # each image vs its colour's 6 prompts
  out['zeroshot_shape_given_colour'] = float(np.mean(np.argmax(scores, 1)
                                                     == attr['shape'][:len(idx)]))
  out['chance_shape'] = 1.0 / len(shapes)
  return out


def validation(world, model_folder: str, corpus_size: int = 20_000) -> dict:
  """Zero-shot shape / colour and mining-query precision@10 on training-split data only."""
  from aesalign_jax.evaluation import zeroshot  # pylint: disable=g-import-not-at-top
  from aesalign_jax.retrieval import search  # pylint: disable=g-import-not-at-top
  cfg, params = hf.load_hf_folder(model_folder)
  if cfg.image_size != world.image_size:   # the same scenes, rendered at the model's size
    world = world_lib.World(world.config, image_size=cfg.image_size)
  embedder = embed.Embedder(cfg, params, ClipTokenizer.from_folder(model_folder))
  train = world.split_indices('train')
  idx, attr = one_object(world, train[-3000:])
  img = embedder.images(world.render_batch(idx))
  out = {}
  for name, templates in (('shape', zeroshot.WORLD_SHAPE_TEMPLATES),
                          ('colour', zeroshot.WORLD_COLOUR_TEMPLATES)):
    classes = zeroshot.class_embeddings(embedder.texts, list(ATTRIBUTES[name]), list(templates))
    out[f'zeroshot_{name}'] = zeroshot.zeroshot_accuracy(img, attr[name], classes)['top1']
  corpus_idx = train[:corpus_size]
  corpus = embedder.images(world.render_batch(corpus_idx))
  queries = world.mining_queries
  _, rows = search.topk(embedder.texts([q.text for q in queries]), corpus, 10)
  relevant = np.stack([world.is_relevant(q, corpus_idx[r]) for q, r in zip(queries, rows)])
  out['mining_precision_at_10'] = float(relevant.mean())
  out['mining_gt_aesthetic_at_10'] = float(world.aesthetic(corpus_idx[rows.reshape(-1)]).mean())
  return out


def batch_negatives(world, batch: int = 128, batches: int = 50, seed: int = 0) -> dict:
  """How often a random batch holds a negative that differs from an image only in shape."""
  rng = np.random.default_rng(seed)
  train = world.split_indices('train')
  only_shape, colour_other_shape, counted = 0, 0, 0
  for _ in range(batches):
    idx = train[rng.integers(0, len(train), batch)]
    ones, a = one_object(world, idx)
    for i in range(len(ones)):
      others = np.arange(len(ones)) != i
      other_shape = others & (a['shape'] != a['shape'][i]) & (a['colour'] == a['colour'][i])
      only_shape += bool(np.any(other_shape & (a['size'] == a['size'][i])
                                & (a['pattern'] == a['pattern'][i])))
      colour_other_shape += bool(np.any(other_shape))
      counted += 1
  return {'batch': batch, 'one_object_images': counted,
          'with_negative_differing_only_in_shape': only_shape / counted,
          'with_negative_same_colour_other_shape': colour_other_shape / counted}


def run(workdir: str = '', quick: bool = False, lrs=(1e-3, 3e-4), steps: int = 600,
        stem: str = 'patch', nuisance_steps: int = 300) -> dict:
  config = default.get_config('smoke' if quick else None)
  world = world_lib.World(config.world)
  cfg = dataclasses.replace(models.clip_config(config.model), vision_stem=stem)
  if quick:
    steps, nuisance_steps, lrs = 4, 4, lrs[:1]
  eval_images = 100 if quick else 2000
  out = {'label_probe': [label_probe(world, cfg, attribute=a, lr=lr, steps=steps,
                                     every=max(1, steps // 6), eval_images=eval_images)
                         for a in ATTRIBUTES for lr in lrs],
         'nuisance_probe': [label_probe(world, cfg, attribute='shape', lr=lrs[0],
                                        steps=nuisance_steps, every=max(1, nuisance_steps // 3),
                                        eval_images=eval_images, nuisance=n)
                            for n in NUISANCES],
         'batch_negatives': batch_negatives(world, batches=2 if quick else 50)}
  model = os.path.join(workdir, 'pretrain', 'model') if workdir else ''
  if model and os.path.exists(model):
    out['separation'] = separation(world, model, eval_images=200 if quick else 2000)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='', help='a run whose pretrain/model to examine')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--lrs', default='1e-3,3e-4')
  parser.add_argument('--nuisance_steps', type=int, default=300)
  parser.add_argument('--stem', default='patch', choices=('patch', 'conv'),
                      help='the vision stem of the probed tower (model.overrides.vision_stem)')
  parser.add_argument('--validation', action='store_true',
                      help="only `validation` of the workdir's PT model")
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  if args.validation:
    world = world_lib.World(default.get_config().world)
    result = validation(world, os.path.join(args.workdir, 'pretrain', 'model'))
  else:
    result = run(args.workdir, args.quick, tuple(float(x) for x in args.lrs.split(',')),
                 args.steps, args.stem, args.nuisance_steps)
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
