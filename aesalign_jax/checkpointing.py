"""Training checkpoints (orbax) holding the train state and every grain iterator's position.

A checkpoint step is one orbax CheckpointManager step with these items:

  <directory>/<step>/state/         the train state pytree (params, opt_state, step, rng, ...),
                                    saved with ocp.args.StandardSave, restored with
                                    ocp.args.StandardRestore into an abstract target
  <directory>/<step>/data_<name>/   one per grain iterator: grain.checkpoint.CheckpointSave /
                                    CheckpointRestore (one JSON file per process)

    ckpt = Checkpointer(workdir / 'checkpoints', save_interval_steps=1000, max_to_keep=3)
    restored = ckpt.restore(abstract_state, {'dpo': dpo_it, 'pairs': pairs_it})
    start, state = restored if restored else (0, init_state())
    for step in range(start + 1, total + 1):
      ...
      ckpt.save(step, state, {'dpo': dpo_it, 'pairs': pairs_it})   # every interval
    ckpt.save(total, state, iterators, force=True); ckpt.close()

Why it is safe:
- Crashes: orbax writes a step into '<step>.orbax-checkpoint-tmp' and renames it only when
  every item is complete, so a crash mid-save leaves the previous steps untouched; steps
  still in a tmp directory are invisible to latest_step() and deleted on the next start.
  Old steps are deleted (max_to_keep) only after a newer one is complete.
- Async saves: save() copies the arrays to host memory and writes the iterators' JSON before
  it returns; files are written in a background thread. The state may be donated or
  overwritten right after save() returns, and the iterators may advance.
- Bounded lag: a save starts only after the previous one is committed (save() waits for it),
  so a kill loses at most the steps since the newest save but one. "checkpoint: step N
  committed" is logged once a step is on disk for good: by poll() (the loop calls it every
  step; it never blocks), else by the next save() or close().
- Structure: restore() always passes the abstract target, so the tree structure (namedtuples
  of optax states, integer dict keys such as transformer block indices) comes from the
  target, not from orbax's on-disk metadata (which stores every key as a string); arrays come
  back with the target's shapes, dtypes and shardings.
- Multi-host: every process calls save() and restore() (orbax synchronises them); each
  process saves and restores its own iterator position.

save_params / load_params write a standalone parameter checkpoint for users (--mode=export).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Optional

import grain
import jax
from etils import epath
import numpy as np
import orbax.checkpoint as ocp

STATE_ITEM = 'state'
DATA_ITEM_PREFIX = 'data_'
_NAME_RE = re.compile(r'^[A-Za-z0-9_-]+$')


def _absolute(directory) -> str:
  directory = os.fspath(directory)
  return directory if '://' in directory else os.path.abspath(directory)  # gs:// stays as is


def _data_item(name: str) -> str:
  if not _NAME_RE.match(name):
    raise ValueError(f'iterator name {name!r}: use letters, digits, "_" or "-" (it names a '
                     'checkpoint directory)')
  return DATA_ITEM_PREFIX + name


class Checkpointer:
  """Periodic, atomic, optionally asynchronous checkpoints of a train state and its data."""

  def __init__(self, directory, *, save_interval_steps: int, max_to_keep: Optional[int],
               async_save: bool = True):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: local path or a gs:// URL; holds one sub-directory per step.
      save_interval_steps: save() without force saves when step % this == 0.
      max_to_keep: newest complete checkpoints to keep (None keeps all).
      async_save: write in a background thread; wait_until_finished() or close() joins it.
    """
    if save_interval_steps <= 0:
      raise ValueError(f'checkpoint.save_interval_steps must be positive, got '
                       f'{save_interval_steps}')
    if max_to_keep is not None and max_to_keep <= 0:
      raise ValueError(f'checkpoint.max_to_keep must be positive or None, got {max_to_keep}')
    self.directory = _absolute(directory)
    self.save_interval_steps = save_interval_steps
    self._async = async_save
    self._pending: Optional[int] = None   # a step saved but not yet seen committed
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            # The interval is decided here (save()); orbax's own policy would also save the
            # first step it is offered, whatever the interval.
            save_interval_steps=None,
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,   # drop steps a crash left half-written
            create=True))

  def should_save(self, step: int) -> bool:
    """True when step is on the save interval and newer than the latest saved step."""
    latest = self.latest_step()
    return step % self.save_interval_steps == 0 and (latest is None or step > latest)

  def save(self, step: int, state: Any, iterators: Optional[Mapping[str, Any]] = None, *,
           force: bool = False) -> bool:
    """Saves state and iterator positions at `step` if due (or force); returns whether it did.

    A step that is already saved (or older than the latest) is never saved again, so a forced
    save at a step the interval just saved (e.g. on SIGTERM) is a no-op.

    Args:
      step: the number of completed train steps the state holds.
      state: a pytree of arrays (jax or numpy) and scalars.
      iterators: name -> grain DatasetIterator, each saved as item 'data_<name>'.
      force: save even off the interval (end of training, preemption).
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      if force and step < latest:
        logging.warning('checkpoint: not saving step %d, older than the latest saved step %d '
                        'in %s', step, latest, self.directory)
      return False
    if not force and step % self.save_interval_steps:
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    for name, it in (iterators or {}).items():
      items[_data_item(name)] = grain.checkpoint.CheckpointSave(it)
    # Bound the lag: an async save still being written when the next one is due would leave
    # a kill in between with nothing newer than the save before it.
    self._commit_pending()
    saved = bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=True))
    if saved:
      self._pending = step
      if not self._async:
        self._commit_pending()
    return saved

  def poll(self) -> None:
    """Logs the pending save's commit if it has finished; never waits for it."""
    if self._pending is not None and not self._mngr.is_saving_in_progress():
      self._commit_pending()

  def _commit_pending(self) -> None:
    """Waits for the pending save (raising its error, if any), then logs its commit."""
    self._mngr.wait_until_finished()
    if self._pending is not None:
      logging.info('checkpoint: step %d committed in %s', self._pending, self.directory)
      self._pending = None

  def restore(self, abstract_state: Any, iterators: Optional[Mapping[str, Any]] = None,
              step: Optional[int] = None) -> Optional[tuple[int, Any]]:
    """Restores a checkpoint: (step, state), or None when the directory holds none.

    Args:
      abstract_state: the state's structure with jax.ShapeDtypeStruct leaves (e.g. from
        jax.eval_shape) whose .sharding says where each array goes; restored arrays have
        exactly these shapes, dtypes, shardings and this tree structure. Real arrays work too.
      iterators: name -> grain DatasetIterator of a pipeline built as the saved one; each is
        set in place to the saved position.
      step: the step to restore; None = the latest complete one.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        return None
    elif step not in self.all_steps():
      raise ValueError(f'checkpoint step {step} not found in {self.directory}; '
                       f'available steps: {self.all_steps()}')
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    for name, it in (iterators or {}).items():
      items[_data_item(name)] = grain.checkpoint.CheckpointRestore(it)
    self._check_items(step, items)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return step, restored[STATE_ITEM]

  def _check_items(self, step: int, items: Mapping[str, Any]):
    step_dir = epath.Path(self.directory) / str(step)   # orbax's default step naming
    saved = sorted(p.name for p in step_dir.iterdir() if p.is_dir())
    missing = [name for name in items if name not in saved]
    if missing:
      raise ValueError(f'checkpoint {step_dir} has no item(s) {missing} (it holds {saved}); '
                       'was it written with the same data iterators?')

  def latest_step(self) -> Optional[int]:
    """The newest step saved (also by an earlier run); a step still being written counts."""
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice (e.g. a Cloud TPU SIGTERM) reached the
    JAX coordination service, at the same step everywhere: save with force=True then."""
    return self._mngr.reached_preemption(step)

  def wait_until_finished(self):
    """Blocks until an asynchronous save has been written (and raises its error, if any)."""
    self._commit_pending()

  def close(self):
    """Waits for a pending save, then releases orbax's resources."""
    self._commit_pending()
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# Standalone parameter checkpoints (export).

def save_params(directory, params: Any) -> None:
  """Writes `params` as a standalone orbax PyTree checkpoint at `directory` (must not exist).

  Loading it needs only orbax (no aesalign code):

    import orbax.checkpoint as ocp
    params = ocp.StandardCheckpointer().restore('/abs/path/params')       # keys are strings
    params = ocp.StandardCheckpointer().restore('/abs/path/params', abstract)  # exact tree

  or, with aesalign, load_params(directory) (integer block keys restored, numpy leaves).
  """
  directory = _absolute(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, params)
    ckptr.wait_until_finished()


def load_params(directory, abstract: Any = None) -> Any:
  """Reads a save_params checkpoint.

  Args:
    directory: what save_params wrote.
    abstract: None: the tree as saved, with numpy leaves in host memory (works on any machine)
      and digit-string dict keys turned back into ints (orbax stores keys as strings; CLIP
      block indices are ints). Otherwise a pytree of jax.ShapeDtypeStruct (with shardings) or
      arrays: jax arrays come back in that structure, with those shapes, dtypes and shardings.
  """
  directory = _absolute(directory)
  if not os.path.isdir(directory) and '://' not in directory:
    raise FileNotFoundError(f'no parameter checkpoint at {directory}')
  if abstract is not None:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(directory, abstract)
  with ocp.PyTreeCheckpointer() as ckptr:
    metadata = ckptr.metadata(directory)
    # orbax >= 0.12 wraps the tree in StepMetadata(item_metadata=TreeMetadata(tree=...)).
    metadata = getattr(getattr(metadata, 'item_metadata', metadata), 'tree', metadata)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    tree = ckptr.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return _int_keys(tree)


def _int_keys(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
            for k, v in tree.items()}
  if isinstance(tree, list):
    return [_int_keys(v) for v in tree]
  return tree
