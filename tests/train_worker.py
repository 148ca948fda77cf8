"""A small pretraining run in its own process, for the resume / preemption / NaN tests.

  python tests/train_worker.py --workdir W --steps 8 --checkpoint_every 4 [--kill_after_save 4]
      [--sigterm_at_batch 5] [--nan_at_step 5]

Writes W/order.jsonl (the world indices of every batch consumed, one line per batch) and, when
training returns, W/params.npz and W/result.json.
"""

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402

flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.INFO)   # stderr, as under main.py's absl app

import jax  # noqa: E402

from aesalign_jax import sharding, tokenizer, train  # noqa: E402
from aesalign_jax.models import clip  # noqa: E402
from configs import default  # noqa: E402
from input_pipeline import pipeline, world as world_lib  # noqa: E402


class RecordingIterator:
  """Proxies a grain iterator, logging each batch's indices; checkpointable like it."""

  def __init__(self, it, path, sigterm_at):
    self._it, self._path, self._sigterm_at, self._n = it, path, sigterm_at, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._n += 1
    with open(self._path, 'a') as f:
      f.write(json.dumps([int(i) for i in batch['index']]) + '\n')
    if self._n == self._sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  # grain's orbax handler treats non-DatasetIterator items as the older DataLoader API:
  # the state travels as JSON bytes.
  def get_state(self):
    return json.dumps(self._it.get_state()).encode()

  def set_state(self, state):
    self._it.set_state(json.loads(state.decode()))

  def start_prefetch(self):
    getattr(self._it, 'start_prefetch', lambda: None)()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--checkpoint_every', type=int, default=4)
  parser.add_argument('--kill_after_save', type=int, default=-1)
  parser.add_argument('--sigterm_at_batch', type=int, default=-1)
  parser.add_argument('--nan_at_step', type=int, default=-1)
  args = parser.parse_args()

  config = default.get_config('smoke')
  c = config.pretrain
  c.steps, c.checkpoint_every, c.batch_size, c.log_every = args.steps, args.checkpoint_every, 16, 2
  c.async_checkpoints = args.kill_after_save < 0   # the kill test needs the save on disk
  c.debug_nan_at_step = args.nan_at_step
  world = world_lib.World(config.world, num_train=512)
  tok_dir = os.path.join(args.workdir, 'tok')
  if os.path.exists(os.path.join(tok_dir, 'tokenizer.json')):
    tok = tokenizer.ClipTokenizer.from_folder(tok_dir)
  else:
    tok = tokenizer.train_bpe(world.captions(np.arange(512)), vocab_size=300, folder=tok_dir,
                              context_length=16)
  cfg = clip.preset('tiny', vision_layers=1, text_layers=1, vocab_size=300,
                    eos_token_id=tok.eos_token_id)
  it = pipeline.make_batched_source_pipeline(world.split_range('train'), world.batch,
                                             batch_size=16, seed=3, tokenize=tok)
  it = RecordingIterator(iter(it), os.path.join(args.workdir, 'order.jsonl'),
                         args.sigterm_at_batch)

  def on_save(step):
    if step == args.kill_after_save:
      os.kill(os.getpid(), signal.SIGKILL)

  try:
    result = train.fit(kind='pretrain', c=c, model_cfg=cfg, init_params=clip.init_params(cfg),
                       iterators={'pairs': it}, mesh=sharding.make_mesh(config.mesh),
                       rules=config.rules, workdir=args.workdir, on_save=on_save)
  except train.NonFiniteError as e:
    print(f'NonFiniteError: {e}', file=sys.stderr)
    return 4
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(result.params)[0]}
  np.savez(os.path.join(args.workdir, 'params.npz'), **flat)
  with open(os.path.join(args.workdir, 'result.json'), 'w') as f:
    json.dump({'status': result.status, 'step': result.step}, f)
  return 0


if __name__ == '__main__':
  sys.exit(main())
