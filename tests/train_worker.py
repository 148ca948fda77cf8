"""A small training run in its own process, for the resume / preemption / NaN tests.

  python tests/train_worker.py --workdir W --steps 8 --checkpoint_every 4 [--kill_after_save 4]
      [--sigterm_at_batch 5] [--nan_at_step 5]

Pretraining on the world: writes W/order.jsonl (the world indices of every batch consumed, one
line per batch) and, when training returns, W/params.npz and W/result.json.

  python tests/train_worker.py --kind align --inputs I --workdir W --steps 6 ...

The align stage (aesalign_jax/stages/align.py) as a real run drives it: the JSON Lines corpus
I/corpus.jsonl, the model folder I/model (HF weights and tokenizer) and the D_po file
I/dpo.arrayrecord. Writes W/order_pairs.jsonl (the corpus ids of each contrastive batch) and
W/order_groups.jsonl (the queries of each D_po batch), then W/params.npz and W/result.json.
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
from input_pipeline import pipeline, preference, world as world_lib  # noqa: E402


class RecordingIterator:
  """Proxies a grain iterator, logging what each batch holds (`describe`: batch -> a JSON
  list; default its world indices); checkpointable like it."""

  def __init__(self, it, path, sigterm_at=-1, describe=None):
    self._it, self._path, self._sigterm_at, self._n = it, path, sigterm_at, 0
    self._describe = describe or (lambda batch: [int(i) for i in batch['index']])

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._n += 1
    with open(self._path, 'a') as f:
      f.write(json.dumps(self._describe(batch)) + '\n')
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
  parser.add_argument('--kind', choices=('pretrain', 'align'), default='pretrain')
  parser.add_argument('--inputs', help='align: the folder of corpus.jsonl, model, dpo file')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--checkpoint_every', type=int, default=4)
  parser.add_argument('--kill_after_save', type=int, default=-1)
  parser.add_argument('--sigterm_at_batch', type=int, default=-1)
  parser.add_argument('--nan_at_step', type=int, default=-1)
  args = parser.parse_args()
  if args.kind == 'align':
    return align(args)

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

  try:
    result = train.fit(kind='pretrain', c=c, model_cfg=cfg, init_params=clip.init_params(cfg),
                       iterators={'pairs': it}, mesh=sharding.make_mesh(config.mesh),
                       rules=config.rules, workdir=args.workdir,
                       on_save=killer(args.kill_after_save))
  except train.NonFiniteError as e:
    print(f'NonFiniteError: {e}', file=sys.stderr)
    return 4
  save_result(args.workdir, result)
  return 0


def killer(kill_after_save):
  """An on_save hook that SIGKILLs this process right after the checkpoint of that step."""
  def on_save(step):
    if step == kill_after_save:
      os.kill(os.getpid(), signal.SIGKILL)
  return on_save


def save_result(workdir, result):
  flat = {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(result.params)[0]}
  np.savez(os.path.join(workdir, 'params.npz'), **flat)
  with open(os.path.join(workdir, 'result.json'), 'w') as f:
    json.dump({'status': result.status, 'step': result.step}, f)


def align_config(inputs, steps, checkpoint_every):
  """configs/default.py:smoke reading the JSON Lines corpus under `inputs`, shrunk. The same
  for the killed and the resumed run: the stage cache clears a stage begun with another."""
  config = default.get_config('smoke')
  config.data.update(source='jsonl', path=os.path.join(inputs, 'corpus.jsonl'), image_size=32,
                     worker_count=0, read_threads=2)
  config.model.dtype = 'float32'
  c = config.align
  c.dpo_path = os.path.join(inputs, 'dpo.arrayrecord')
  c.steps, c.checkpoint_every, c.log_every = steps, checkpoint_every, 1
  c.batch_size, c.groups_per_step, c.u, c.v = 8, 2, 2, 2
  c.async_checkpoints = False   # the kill test needs the save on disk
  c.optim.warmup_steps = 1
  return config


def align(args):
  """The align stage on args.inputs, each stream's batches recorded (module docstring)."""
  from aesalign_jax.stages import align as align_stage, context
  config = align_config(args.inputs, args.steps, args.checkpoint_every)
  model = os.path.join(args.inputs, 'model')
  tok = tokenizer.ClipTokenizer.from_folder(model)
  groups = preference.open_groups(config.align.dpo_path)
  queries = [groups[i].query for i in range(len(groups))]
  # A D_po batch holds its queries tokenised: each row is mapped back to its query.
  by_tokens = {tuple(row): q for q, row in zip(queries, tok(queries)['ids'].tolist())}
  describe = {'pairs': lambda batch: [str(i) for i in batch['id']],
              'groups': lambda batch: [by_tokens[tuple(row)] for row in batch['ids'].tolist()]}
  fit = train.fit

  def recorded_fit(*, iterators, **kw):   # what align.run calls as train.fit
    iterators = {name: RecordingIterator(it, os.path.join(args.workdir, f'order_{name}.jsonl'),
                                         describe=describe[name])
                 for name, it in iterators.items()}
    result = fit(iterators=iterators, on_save=killer(args.kill_after_save), **kw)
    save_result(args.workdir, result)
    return result

  train.fit = recorded_fit
  ctx = context.Context(config, args.workdir, sharding.make_mesh(config.mesh))
  align_stage.run(ctx, {'pretrain': model})
  return 0


if __name__ == '__main__':
  sys.exit(main())
