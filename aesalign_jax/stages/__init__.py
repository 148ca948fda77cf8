"""The stages of the method (DESIGN.md's data flow), each cached in the workdir.

    tokenizer -> pretrain -> aesthetic -> mine -> align -> eval -> export

Each stage is one module with `run(ctx, inputs) -> output` (a folder or file the next stages
read) and the stages it needs (`NEEDS`, or `needs(config)` where a config key decides: align
needs no mining when config.align.dpo_path names D_po). `run(mode, config, workdir)` runs a
stage after the ones it needs, each once per process; a finished stage with the same config is
skipped (stages/cache.py), so a rerun resumes where the last one stopped. `start` opens the
corpus first, so main.py refuses an unusable one with the other config errors.
"""

from __future__ import annotations

from aesalign_jax import sharding
from aesalign_jax.stages import aesthetic, align, evaluate, export, mine
from aesalign_jax.stages import pretrain, tokenizer
from aesalign_jax.stages.context import Context, Preempted  # noqa: F401  (main.py's API)

# Stage name -> module, in the order of the data flow (--mode=all runs them all).
STAGES = {'tokenizer': tokenizer, 'pretrain': pretrain, 'aesthetic': aesthetic, 'mine': mine,
          'align': align, 'eval': evaluate, 'export': export}
ORDER = tuple(STAGES)
# --mode=serve is no stage: main.py hands a finished run to the search server (serve.py).
MODES = ('all',) + ORDER + ('serve',)


def needs(name: str, config) -> tuple:
  """The stages `name` reads the outputs of."""
  module = STAGES[name]
  return module.needs(config) if hasattr(module, 'needs') else module.NEEDS


def output(ctx: Context, name: str):
  """The output of stage `name`, running (or skipping) it and the stages it needs once."""
  if name not in ctx.outputs:
    inputs = {dep: output(ctx, dep) for dep in needs(name, ctx.config)}
    ctx.outputs[name] = STAGES[name].run(ctx, inputs)
  return ctx.outputs[name]


def start(config, workdir: str, mesh=None) -> Context:
  """The run's context with its corpus opened, before any stage runs: a corpus the stages
  cannot use (record ids that repeat) raises ValueError here, not after hours of training.
  The corpus is opened once per process (corpus.open_corpus), so the stages reuse it."""
  ctx = Context(config, workdir, mesh if mesh is not None else sharding.make_mesh(config.mesh))
  _ = ctx.corpus
  return ctx


def run(mode: str, config, workdir: str, mesh=None) -> Context:
  """Runs stage `mode` (or every stage: 'all') and what it needs; returns the run's context."""
  if mode not in ('all',) + ORDER:
    raise ValueError(f'--mode={mode!r}: expected one of {", ".join(("all",) + ORDER)} (serve: '
                     'main.py, aesalign_jax/serve.py)')
  ctx = start(config, workdir, mesh)
  for name in (ORDER if mode == 'all' else (mode,)):
    output(ctx, name)
  return ctx
