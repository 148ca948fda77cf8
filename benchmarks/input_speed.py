"""Input pipelines vs the train steps they feed: the pipeline must not be the bottleneck.

  python -m benchmarks.input_speed [--quick]

1. The world's image-text pipeline exactly as the pretrain stage builds it
   (Corpus.pairs_pipeline of the world corpus: grain, vectorised rendering, BPE tokenisation; default
   config: batch 128, no worker processes) in batches/s, against the tiny model's pretrain
   steps/s at the same batch, and an fp32 matmul (the step's MFU).
2. The preference-group pipeline as the align stage builds it
   (preference.make_preference_pipeline over world_image_lookup; 8 groups of 5 x 5 images per
   batch) against the align step (64 image-text pairs + 8 groups, lambda = 1).

Each is timed alone, in alternation with the step: a pipeline run builds a fresh iterator,
takes `n` batches (the time counted runs from the iterator's creation to the n-th batch, so
start-up is charged to the pipeline), closes it and waits for its threads to exit before
the step is timed. The ratio pipeline batches/s / train steps/s must be >= 2: then the
pipeline keeps up with training on the cores it shares with it.
The tokenizer is a BPE trained on 5,000 world captions (the stage uses up to 50,000; the
vocabulary size, which is the config's, is what matters for speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import threading
import time

import numpy as np

from aesalign_jax import tokenizer as tokenizer_lib
from input_pipeline import corpus as corpus_lib
from benchmarks import steps, timing


def _settle(threads_before: int, timeout_s: float = 10.0) -> None:
  """Waits until the threads a closed pipeline started have exited (or timeout_s)."""
  deadline = time.perf_counter() + timeout_s
  while threading.active_count() > threads_before and time.perf_counter() < deadline:
    time.sleep(0.005)


class PipelineRun:
  """Calling it: fresh iterator, `n` batches, close; returns the Measured seconds to the n-th."""

  def __init__(self, make_dataset, n: int):
    self.make_dataset, self.n = make_dataset, n
    self.batch = None

  def __call__(self):
    threads = threading.active_count()
    start = time.perf_counter()
    it = iter(self.make_dataset())
    for _ in range(self.n):
      self.batch = next(it)
    seconds = time.perf_counter() - start
    it.close()
    del it              # closed here, not by a finaliser at interpreter exit
    _settle(threads)
    return timing.Measured(seconds)


@dataclasses.dataclass
class Setup:
  config: object      # configs/default.py
  world: object
  tok: object
  cfg: object         # the tiny ClipConfig with the tokenizer's end token


def make_setup(quick: bool) -> Setup:
  from aesalign_jax.stages import context  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from input_pipeline import world as world_lib  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  if quick:
    config.world.num_train = 20_000
    config.pretrain.batch_size = 32
    config.align.batch_size = 16
    config.align.groups_per_step = 2
  world = world_lib.World(config.world)
  with tempfile.TemporaryDirectory() as folder:
    tok = tokenizer_lib.train_bpe(world.captions(np.arange(1000 if quick else 5000)),
                                  vocab_size=config.tokenizer.vocab_size, folder=folder,
                                  context_length=config.tokenizer.context_length)
  cfg = context.model_with_tokenizer(config.model, tok)
  if quick:
    cfg = dataclasses.replace(cfg, vision_layers=1, text_layers=1)
  return Setup(config, world, tok, cfg)


def _measure(pipe: PipelineRun, step: steps.TrainStep, *, repeats, max_seconds,
             matmul_n) -> dict:
  peak = steps.Matmul(matmul_n)
  times = timing.interleaved_times({'pipeline': pipe, 'train_step': step, 'matmul': peak},
                                   warmup=1, repeats=repeats, max_seconds=max_seconds)
  med = {name: float(np.median(t)) for name, t in times.items()}
  batches_per_s = pipe.n / med['pipeline']
  steps_per_s = 1.0 / med['train_step']
  peak_gflops = peak.flops / med['matmul'] / 1e9
  return {'pipeline_batches_per_s': batches_per_s, 'train_steps_per_s': steps_per_s,
          'pipeline_over_train': batches_per_s / steps_per_s,
          'batches_per_pipeline_run': pipe.n, 'train_step_s': med['train_step'],
          'train_step_flops': step.flops, 'train_step_gflops': step.flops / med['train_step'] / 1e9,
          'matmul_n': matmul_n, 'matmul_peak_gflops': peak_gflops,
          'train_step_mfu': step.flops / med['train_step'] / 1e9 / peak_gflops,
          'compile_s': step.compile_s, 'loss': step.loss,
          'timings': {name: timing.spread(t) for name, t in times.items()}}


def pairs_vs_pretrain(s: Setup, *, batches: int = 16, repeats: int = 5,
                      max_seconds: float | None = None, matmul_n: int = 2048) -> dict:
  """The pretrain stage's world pipeline vs the pretrain step at config.pretrain.batch_size."""
  corpus = corpus_lib.WorldCorpus(s.world, 'train')
  make = lambda: corpus.pairs_pipeline(
      s.tok, batch_size=s.config.pretrain.batch_size, seed=s.config.seed, data=s.config.data)
  pipe = PipelineRun(make, batches)
  pipe()                                          # one batch for the step's shapes
  step = steps.TrainStep(s.cfg, s.config.pretrain, 'pretrain', {'pairs': pipe.batch})
  row = _measure(pipe, step, repeats=repeats, max_seconds=max_seconds, matmul_n=matmul_n)
  row.update(batch_size=s.config.pretrain.batch_size, model='tiny',
             model_layers=(s.cfg.vision_layers, s.cfg.text_layers),
             image_size=s.cfg.image_size, worker_count=s.config.data.worker_count,
             pipeline='WorldCorpus.pairs_pipeline')
  return row


def groups_vs_align(s: Setup, *, batches: int = 8, repeats: int = 5,
                    max_seconds: float | None = None, matmul_n: int = 2048,
                    max_queries: int | None = None) -> dict:
  """The align stage's preference-group pipeline vs the align step (pairs + groups)."""
  # pylint: disable-next=g-import-not-at-top
  from input_pipeline import pipeline, preference, world_groups
  c = s.config.align
  n = c.u * c.v
  queries = s.world.mining_queries[:max_queries]
  groups = world_groups.world_groups(
      s.world, queries, u=c.u, v=c.v, rng=0,
      ref_score_fn=lambda texts, ids: np.zeros((len(texts), n)))
  lookup = preference.world_image_lookup(s.world)
  make = lambda: preference.make_preference_pipeline(groups, lookup, s.tok,
                                                     batch_size=c.groups_per_step, seed=0)
  pipe = PipelineRun(make, batches)
  pipe()
  pairs_it = iter(pipeline.make_batched_source_pipeline(
      s.world.split_range('train'), s.world.batch, batch_size=c.batch_size, seed=1,
      tokenize=s.tok, prefetch_buffer_size=0))
  pairs = next(pairs_it)
  pairs_it.close()
  del pairs_it
  step = steps.TrainStep(s.cfg, c, 'align', {'pairs': pairs, 'groups': pipe.batch})
  row = _measure(pipe, step, repeats=repeats, max_seconds=max_seconds, matmul_n=matmul_n)
  row.update(groups_per_step=c.groups_per_step, u=c.u, v=c.v, pairs_per_step=c.batch_size,
             lam=c.lam, groups_in_source=len(groups), model='tiny',
             pipeline='preference.make_preference_pipeline')
  return row


def run(quick: bool = False) -> dict:
  s = make_setup(quick)
  kw = dict(repeats=2, matmul_n=512) if quick else dict(repeats=5, max_seconds=40)
  return {
      'pairs_pipeline_vs_pretrain_step': pairs_vs_pretrain(s, batches=4 if quick else 16, **kw),
      'groups_pipeline_vs_align_step': groups_vs_align(
          s, batches=2 if quick else 8, max_queries=24 if quick else None, **kw),
  }


if __name__ == '__main__':
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true')
  result = run(parser.parse_args().quick)
  for name, r in result.items():
    print(f"{name}: pipeline {r['pipeline_batches_per_s']:.1f} batches/s vs train "
          f"{r['train_steps_per_s']:.2f} steps/s -> {r['pipeline_over_train']:.1f}x "
          f"(step at {100 * r['train_step_mfu']:.0f}% of the matmul peak)")
  print(json.dumps(result))
