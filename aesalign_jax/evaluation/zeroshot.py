"""Zero-shot classification: class names x prompt templates -> a text classifier; top-1/top-5.

    class_emb = class_embeddings(system.embed_texts, ['circle', 'square'], ['a photo of a {}'])
    zeroshot_accuracy(img_emb [N, D], labels [N], class_emb [C, D])   # {'top1':.., 'top5':..}

A class's weight is the mean of its templates' normalised text embeddings, renormalised (the
CLIP prompt ensemble). An image is classified by the class with the highest cosine
similarity; top-k counts a hit when the true class is among the k best. Classes within
`tie_tol` of the true class's score are ties, broken at random (expected accuracy), so a
classifier that cannot tell classes apart scores chance.

Tasks (config `task`):
- 'world_shape' / 'world_colour': the embedded world's split; classes SHAPES or COLOURS, the
  label the subject's (object 0's) shape or colour. With `single_object` (default) only
  one-object images count: with two objects the picture does not say which one is the
  subject, so the label would be a guess.
- 'tfds': any prepared tfds image classification set (input_pipeline.sources.TfdsSource);
  class names from the builder's ClassLabel, or `class_names` (e.g. ImageNet's readable names,
  since tfds names ImageNet classes by WordNet id).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import ml_collections
import numpy as np

from aesalign_jax.evaluation import common
from input_pipeline import world_scene

# Templates in the world's own words: captions read "a <size> <colour> <shape> on a ...".
# Shapes are prompted across every colour and colours across every shape, so the ensemble
# averages the other attribute out instead of favouring one of its values.
WORLD_SHAPE_TEMPLATES = (('a photo of a {}', 'an image of a {}', 'a small {}', 'a large {}')
                         + tuple(f'a {c} {{}}' for c in world_scene.COLOURS))
WORLD_COLOUR_TEMPLATES = (tuple(f'a {{}} {s}' for s in world_scene.SHAPES)
                          + tuple(f'a photo of a {{}} {s}' for s in world_scene.SHAPES))
# A short ensemble for natural images (a subset of CLIP's ImageNet prompts).
PHOTO_TEMPLATES = ('a photo of a {}.', 'a bad photo of a {}.', 'a photo of the large {}.',
                   'a photo of the small {}.', 'a close-up photo of a {}.',
                   'a bright photo of a {}.', 'art of the {}.', 'itap of a {}.')
TASKS = ('world_shape', 'world_colour', 'tfds')


def default_config(task: str = 'world_shape') -> ml_collections.ConfigDict:
  """A zero-shot section of config.evals (type 'zeroshot')."""
  if task not in TASKS:
    raise ValueError(f'zeroshot task {task!r}: expected one of {TASKS}')
  c = ml_collections.ConfigDict()
  c.type = 'zeroshot'
  c.task = task                 # world_shape | world_colour | tfds
  # Prompt templates, each with one '{}' for the class name; () = the task's defaults.
  c.templates = ()
  # World tasks: the split, and whether to keep only one-object images (see the docstring).
  c.split = 'eval'
  c.single_object = True
  # tfds task: a prepared dataset (ArrayRecord), its split, data_dir ('' = tfds default),
  # label feature, and image side the images are resized and centre-cropped to.
  c.tfds_name = ''
  c.tfds_split = 'test'
  c.tfds_data_dir = ''
  c.label_key = 'label'
  c.image_size = 224
  # Readable class names overriding the builder's: a list, or a text file one name a line
  # ('' = from the dataset; underscores become spaces).
  c.class_names = ''
  # Evaluate at most this many images (0 = all), embedding batch_size at a time.
  c.max_images = 0
  c.batch_size = 256
  c.tie_tol = 1e-6
  return c


def class_embeddings(embed_texts: Callable[[list[str]], np.ndarray],
                     class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
  """[C, D] unit vectors: per class, the mean of its normalised template embeddings,
  renormalised. All C x T prompts are embedded in one call."""
  if not class_names or not templates:
    raise ValueError(f'class_embeddings: {len(class_names)} classes, {len(templates)} '
                     'templates; need at least one of each')
  bad = [t for t in templates if t.count('{}') != 1]
  if bad:
    raise ValueError(f"class_embeddings: each template needs exactly one '{{}}': {bad}")
  prompts = [t.format(name) for name in class_names for t in templates]
  emb = common.l2_normalize(embed_texts(prompts))
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return common.l2_normalize(emb)


def zeroshot_accuracy(img_emb, labels, class_emb, *, ks: Sequence[int] = (1, 5),
                      tie_tol: float = 1e-6, chunk: int = 8192) -> dict[str, float]:
  """{'top1', 'top5'} (one key per k; k is capped at the number of classes) of classifying
  `img_emb` [N, D] by cosine similarity with `class_emb` [C, D]; labels int [N] in [0, C)."""
  img = np.asarray(img_emb, np.float32)
  cls = np.asarray(class_emb, np.float32)
  labels = np.asarray(labels)
  if img.ndim != 2 or cls.ndim != 2 or img.shape[1] != cls.shape[1]:
    raise ValueError(f'zeroshot_accuracy: image embeddings {img.shape} and class embeddings '
                     f'{cls.shape} must be [N, D] and [C, D] with the same D')
  if labels.shape != (len(img),) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'zeroshot_accuracy: labels must be int [{len(img)}], got '
                     f'{labels.dtype} {labels.shape}')
  if len(img) == 0:
    raise ValueError('zeroshot_accuracy: no images')
  if labels.min() < 0 or labels.max() >= len(cls):
    raise ValueError(f'zeroshot_accuracy: labels must be in [0, {len(cls)}), got '
                     f'[{labels.min()}, {labels.max()}]')
  greater, ties = [], []
  for s in range(0, len(img), chunk):   # C is small: [chunk, C] scores at a time
    scores = img[s:s + chunk].astype(np.float64) @ cls.astype(np.float64).T
    right = scores[np.arange(len(scores)), labels[s:s + chunk]][:, None]
    others = np.ones_like(scores, bool)
    others[np.arange(len(scores)), labels[s:s + chunk]] = False
    greater.append(np.sum(others & (scores > right + tie_tol), axis=1))
    ties.append(np.sum(others & (np.abs(scores - right) <= tie_tol), axis=1))
  greater, ties = np.concatenate(greater), np.concatenate(ties)
  return {f'top{k}': float(common.expected_hit(greater, ties, min(k, len(cls))).mean())
          for k in ks}


def world_task(world, task: str, split: str = 'eval', single_object: bool = True,
               max_images: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """(world indices, labels, class names) of a world task ('world_shape' / 'world_colour')."""
  idx = world.split_indices(split)
  scene = world.scene(idx)
  if single_object:
    keep = scene.num_objects == 1
    idx = idx[keep]
    scene_labels = (scene.shape if task == 'world_shape' else scene.colour)[keep, 0]
  else:
    scene_labels = (scene.shape if task == 'world_shape' else scene.colour)[:, 0]
  if max_images:
    idx, scene_labels = idx[:max_images], scene_labels[:max_images]
  names = world_scene.SHAPES if task == 'world_shape' else world_scene.COLOURS
  return idx, scene_labels.astype(np.int64), tuple(names)


def _read_class_names(spec) -> Optional[list[str]]:
  if not spec:
    return None
  if isinstance(spec, str):
    with open(spec, encoding='utf-8') as f:
      return [line.strip() for line in f if line.strip()]
  return [str(s) for s in spec]


def tfds_label_names(source) -> list[str]:
  """Class names of a TfdsSource's label feature (builder info), underscores as spaces."""
  return [str(n).replace('_', ' ') for n in source.class_names()]


@common.register('zeroshot')
class ZeroShotEvaluator(common.Evaluator):
  """Top-1 / top-5 zero-shot accuracy (config: default_config). Context: `world` for the
  world tasks."""

  def run(self, system: common.System) -> dict[str, float]:
    c = self.config
    if c.task in ('world_shape', 'world_colour'):
      img, labels, names = self._world(system)
      default_templates = (WORLD_SHAPE_TEMPLATES if c.task == 'world_shape'
                           else WORLD_COLOUR_TEMPLATES)
    elif c.task == 'tfds':
      img, labels, names = self._tfds(system)
      default_templates = PHOTO_TEMPLATES
    else:
      raise ValueError(f'evals.{self.name}.task={c.task!r}: expected one of {TASKS}')
    templates = tuple(c.templates) or default_templates
    class_emb = class_embeddings(system.embed_texts, names, templates)
    out = zeroshot_accuracy(img, labels, class_emb, tie_tol=c.tie_tol)
    out['num_images'] = float(len(labels))
    out['num_classes'] = float(len(names))
    return out

  def _world(self, system):
    c, world = self.config, self.need('world')
    idx, labels, names = world_task(world, c.task, c.split, c.single_object, c.max_images)
    # The whole split is embedded (the key other world evaluators use), so every world
    # evaluator shares one embedding of it per model.
    split = world.split_indices(c.split)
    img = self.cache.get(system, f'world:{c.split}:{len(split)}', lambda: common.embed_chunks(
        system, len(split), c.batch_size, lambda rows: world.render_batch(split[rows])))
    return img[idx - split[0]], labels, names

  def _tfds(self, system):
    from input_pipeline import sources  # pylint: disable=g-import-not-at-top
    c = self.config
    if not c.tfds_name:
      raise ValueError(f"evals.{self.name}: task 'tfds' needs tfds_name")
    src = sources.TfdsSource(c.tfds_name, split=c.tfds_split, data_dir=c.tfds_data_dir or None,
                             image_size=c.image_size, label_key=c.label_key)
    names = _read_class_names(c.class_names) or tfds_label_names(src)
    n = min(len(src), c.max_images) if c.max_images else len(src)

    def embed_all():
      parts, labels = [], []
      for s in range(0, n, c.batch_size):
        records = [src[i] for i in range(s, min(n, s + c.batch_size))]
        parts.append(system.embed_images(np.stack([r['image'] for r in records])))
        labels.extend(r['label'] for r in records)
      self._labels = np.asarray(labels, np.int64)
      return np.concatenate(parts)

    key = f'tfds:{c.tfds_name}:{c.tfds_split}:{c.image_size}:{n}'
    if getattr(self, '_labels', None) is None or len(self._labels) != n:
      self._labels = None
    img = self.cache.get(system, key, embed_all)
    if self._labels is None:   # another evaluator embedded the set: read the labels only
      self._labels = np.asarray([src[i]['label'] for i in range(n)], np.int64)
    if len(names) <= int(self._labels.max()):
      raise ValueError(f'evals.{self.name}: {len(names)} class names but label '
                       f'{int(self._labels.max())} occurs')
    return img, self._labels, names
