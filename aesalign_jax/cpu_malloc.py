"""glibc malloc settings that stop XLA:CPU from page-faulting its buffers in at every step.

glibc hands allocations above its mmap threshold (at most 32 MiB) straight to the kernel and
gives them back on free, and threads allocate from extra arenas that are mmap'd too. XLA:CPU
allocates and frees a step's temporaries on every call, so each step faults its working
memory back in, zero-filled by the kernel. Measured on the tiny model's pretrain step
(batch 128, 2 cores, one run, loaded machine): 59,000 minor faults and 139 ms of kernel time
per step, 441 ms of CPU in all; with MALLOC_TUNABLES, 0 faults and 269 ms (the same loss to
the last bit). Freed memory stays in the process's heap for the next step instead.
benchmarks/run_all's malloc_tunables row (quiet machine, child processes alternated): 0.166 vs
0.211 s per step, 0 vs 59,470 faults. Only arena_max=1 removes the faults (XLA's worker
threads otherwise allocate from mmap'd arenas: arena_max=4 measured 1.01x, 59,428 faults).
The costs, measured: a small step waits on the one arena's lock (the tiny model's train step
at batch 8: 32.5 ms instead of 15.6), and the heap never shrinks (RSS 1.6 GB instead of 1.0 GB
after 150 tiny pretrain steps). The default job's time is in batch-128 steps.

The settings only take effect at process start (the dynamic loader reads GLIBC_TUNABLES), so
entry points call reexec_with_tunables() first: it re-executes the same command once with them
set. AESALIGN_MALLOC=system skips it.
"""

from __future__ import annotations

import os
import platform
import sys

# mmap_max=0: no allocation goes to mmap; trim_threshold: never give the heap top back;
# arena_max=1: one heap for every thread (extra arenas are mmap'd regions themselves).
MALLOC_TUNABLES = ('glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:'
                   'glibc.malloc.arena_max=1')
OPT_OUT = 'AESALIGN_MALLOC'


def tuned_env(env=None) -> dict:
  """env (default os.environ) with MALLOC_TUNABLES added to GLIBC_TUNABLES."""
  env = dict(os.environ if env is None else env)
  if MALLOC_TUNABLES not in env.get('GLIBC_TUNABLES', ''):
    env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES'), MALLOC_TUNABLES]))
  return env


def applies() -> bool:
  """Whether this process should run with the tunables (Linux with glibc, not opted out)."""
  return (sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'
          and os.environ.get(OPT_OUT, '') != 'system')


def reexec_with_tunables() -> None:
  """Re-executes this Python command with MALLOC_TUNABLES unless they are already set (or do
  not apply); returns only when no re-execution is needed."""
  if not applies() or MALLOC_TUNABLES in os.environ.get('GLIBC_TUNABLES', ''):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  argv = [sys.executable] + list(getattr(sys, 'orig_argv', [])[1:] or sys.argv)
  os.execve(sys.executable, argv, tuned_env())
