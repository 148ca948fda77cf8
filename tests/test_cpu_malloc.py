"""The opt-in glibc malloc settings (aesalign_jax/cpu_malloc.py): off unless requested, set
once when requested, added to existing tunables, and what they are for: XLA:CPU steps stop
page-faulting their buffers in."""

import os
import subprocess
import sys
import textwrap

import pytest

from aesalign_jax import cpu_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not cpu_malloc.supported(), reason='needs Linux with glibc')


def _run(code: str, **env) -> str:
  clean = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', cpu_malloc.OPT_IN)}
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, timeout=600,
                        capture_output=True, text=True, env={**clean, **env})
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


REEXEC = """
    import os
    print('started', flush=True)
    from aesalign_jax import cpu_malloc
    cpu_malloc.reexec_with_tunables()
    print('tunables', os.environ.get('GLIBC_TUNABLES', ''))
"""


def test_entry_point_runs_on_the_system_malloc_unless_asked():
  out = _run(REEXEC).splitlines()
  assert out == ['started', 'tunables '], out
  out = _run(REEXEC, **{cpu_malloc.OPT_IN: 'system'}).splitlines()
  assert out == ['started', 'tunables '], out


def test_when_asked_the_entry_point_reexecutes_once_with_the_tunables():
  out = _run(REEXEC, **{cpu_malloc.OPT_IN: 'tuned'}).splitlines()
  # Two starts (the first process, then the re-executed one), one finish, tunables set.
  assert out == ['started', 'started', f'tunables {cpu_malloc.MALLOC_TUNABLES}'], out


def test_existing_tunables_are_kept():
  out = _run(REEXEC, GLIBC_TUNABLES='glibc.malloc.tcache_count=0',
             **{cpu_malloc.OPT_IN: 'tuned'}).splitlines()
  assert out[-1] == f'tunables glibc.malloc.tcache_count=0:{cpu_malloc.MALLOC_TUNABLES}'


def test_tunables_stop_xla_steps_from_faulting_their_buffers_in():
  from benchmarks import malloc_speed
  clean = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', cpu_malloc.OPT_IN)}
  faults = lambda env: malloc_speed.run_child(
      env, batch=64, steps=5, overrides={'vision_layers': 2, 'text_layers': 2})['minor_faults']
  without = faults(clean)
  with_tunables = faults(cpu_malloc.tuned_env(clean))
  # Without: each train step faults its temporaries in, 4 KiB at a time. Measured here:
  # 15,973 faults per step without, 2,967 with (the default job's batch 128 and 4 layers:
  # 59,000 and 0).
  assert without >= 3000, without
  assert with_tunables <= without // 3, (with_tunables, without)
