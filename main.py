"""aesalign entry point.

  python main.py --config=configs/default.py --workdir=/tmp/aesalign [--mode=all]

--config is an ml_collections config file (get_config(arg); `file.py:arg` passes arg) whose
fields can be overridden with flags such as --config.model.preset=vit_b16. The config is checked
before anything compiles; --mode picks the stage(s) to run (all | pretrain | mine | align | eval |
export), or serve: the search page and API over a finished run (aesalign_jax/serve.py). Multi-host platforms (Cloud TPU slices, SLURM or MPI launches) get
jax.distributed.initialize() first.
"""

if __name__ == '__main__':   # first, before XLA loads: see aesalign_jax/cpu_malloc.py
  from aesalign_jax import cpu_malloc
  cpu_malloc.reexec_with_tunables()

import logging as pylogging  # pylint: disable=g-import-not-at-top,wrong-import-position
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (get_config(arg)).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for every output; a rerun resumes from it.')
flags.DEFINE_enum('mode', 'all', common.MODES, 'Which stage(s) to run.')
flags.mark_flags_as_required(['config', 'workdir'])

_MULTIPROCESS_ENV = ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE',
                     'TPU_WORKER_HOSTNAMES')


def _launched_multiprocess() -> bool:
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1 or int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return True
  return ',' in env.get('TPU_WORKER_HOSTNAMES', '')   # a multi-host Cloud TPU slice


def maybe_initialize_distributed(c) -> None:
  """jax.distributed.initialize as config.distributed (c) says: with its coordinator, process
  count and id when given (checked first: a bad value exits 2 before anything starts), else
  from the TPU/SLURM/MPI environment."""
  import jax
  from aesalign_jax import config_checks
  try:
    config_checks.check_distributed(c)
  except ValueError as e:
    _refuse(str(e))
  if c.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', c.cpu_collectives)
  explicit = bool(c.coordinator_address)
  if c.initialize == 'on' or (c.initialize == 'auto' and (explicit or _launched_multiprocess())):
    if explicit:
      jax.distributed.initialize(coordinator_address=c.coordinator_address,
                                 num_processes=c.num_processes, process_id=c.process_id)
    else:
      jax.distributed.initialize()   # reads the coordinator from the TPU/SLURM/MPI environment


def _refuse(message: str) -> None:
  """Exits 2 naming what is wrong, before any stage runs: how every bad config ends."""
  print(f'error: refused config: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing; an override of a key the config does not have
  (--config.pretrain.stepz=5) is refused like every other bad config, exit 2 with the key
  named, instead of ending in ml_collections' traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError):
    from aesalign_jax import config_checks
    unknown = config_checks.unknown_override(argv)
    if unknown is None:
      raise
    _refuse(unknown)


class _QuietLibraries(pylogging.Filter):
  """Drops the INFO chatter of orbax and XLA's backend probing; warnings still pass."""
  NOISY = ('orbax', 'xla_bridge', 'etils')

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for handler in pylogging.getLogger().handlers + pylogging.getLogger('absl').handlers:
    handler.addFilter(_QuietLibraries())
  config = FLAGS.config
  maybe_initialize_distributed(config.distributed)

  import jax
  from aesalign_jax import config_checks, sharding, stages

  try:
    model_cfg = config_checks.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    stages.start(config, FLAGS.workdir, mesh)   # opens the corpus: refuses repeated ids
  except ValueError as e:
    logging.error('refused config: %s', e)
    _refuse(str(e))
  logging.info('process %d of %d; %d devices (%d local): %s', jax.process_index(),
               jax.process_count(), jax.device_count(), jax.local_device_count(),
               jax.devices()[0].device_kind)
  logging.info('%s', sharding.describe(mesh))
  logging.info('model: %s', model_cfg)
  if FLAGS.mode == 'serve':   # no stage: it serves what the stages wrote, until stopped
    from aesalign_jax import serve
    serve.main(config, FLAGS.workdir, mesh)
    return
  os.makedirs(FLAGS.workdir, exist_ok=True)
  stages.run(FLAGS.mode, config, FLAGS.workdir, mesh)   # (reusing the corpus opened above)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
