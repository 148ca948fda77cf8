"""aesalign_jax/cpu_malloc.py's glibc settings vs the system malloc, two ways: the tiny
model's pretrain step alone in a process (wall time, CPU time and page faults per step), and
the default job's pretrain stage through main.py (s/step with its data pipeline running).

  python -m benchmarks.malloc_speed [--quick] [--job]

The settings only act at process start, so each side runs in child processes, alternated
(tuned, system, tuned, system, ...): a noisy machine then slows both alike. The two sides must
compute the same loss to the last bit (malloc does not change arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from aesalign_jax import cpu_malloc

CHILD = """
import json, resource, time
from absl import flags
flags.FLAGS.mark_as_parsed()
from aesalign_jax import train
from aesalign_jax.models import clip
from benchmarks import steps
cfg = clip.preset('tiny', **json.loads({overrides!r}))
c = train.default_config('pretrain')
c.batch_size = {batch}
step = steps.TrainStep(cfg, c, 'pretrain', {{'pairs': steps.random_pairs(cfg, {batch})}})
for _ in range(3):
  step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range({steps}):
  step()
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
n = {steps}
print(json.dumps({{'step_s': (t1 - t0) / n, 'user_s': (r1.ru_utime - r0.ru_utime) / n,
                  'sys_s': (r1.ru_stime - r0.ru_stime) / n,
                  'minor_faults': (r1.ru_minflt - r0.ru_minflt) / n, 'loss': step.loss}}))
"""


def run_child(env: dict, *, batch: int, steps: int, overrides: dict) -> dict:
  """One child process with `env`: per-step wall, user and system seconds, minor faults, loss."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = CHILD.format(batch=batch, steps=steps, overrides=json.dumps(overrides))
  proc = subprocess.run([sys.executable, '-c', code], cwd=root, env=env, capture_output=True,
                        text=True, timeout=900)
  if proc.returncode:
    raise RuntimeError(f'malloc_speed child failed: {proc.stderr[-1500:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(*, batch: int = 128, steps: int = 20, rounds: int = 3,
            overrides: dict | None = None) -> dict:
  """`rounds` alternations of a tuned child and a system-malloc child; medians per side."""
  overrides = overrides or {}
  envs = _envs()
  runs = {name: [] for name in envs}
  for _ in range(rounds):
    for name, env in envs.items():
      runs[name].append(run_child(env, batch=batch, steps=steps, overrides=overrides))
  losses = {name: {r['loss'] for r in rs} for name, rs in runs.items()}
  if losses['tuned'] != losses['system']:
    raise AssertionError(f'the malloc settings changed the loss: {losses}')
  med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0] if key != 'loss'}
         for name, rs in runs.items()}
  return {'batch': batch, 'steps': steps, 'rounds': rounds, 'overrides': overrides,
          'tunables': cpu_malloc.MALLOC_TUNABLES, 'tuned': med['tuned'], 'system': med['system'],
          'system_over_tuned': med['system']['step_s'] / med['tuned']['step_s'],
          'cpu_system_over_tuned': ((med['system']['user_s'] + med['system']['sys_s'])
                                    / (med['tuned']['user_s'] + med['tuned']['sys_s'])),
          'loss': losses['tuned'].pop()}


def _envs() -> dict:
  base = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', cpu_malloc.OPT_IN)}
  return {'tuned': cpu_malloc.tuned_env(base), 'system': base}


def run_job(env: dict, workdir: str, *, steps: int) -> dict:
  """main.py's default config, pretrain stage only, `steps` steps: s/step over the second half
  (the logger's last record) and the final loss."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={workdir}',
       '--mode=pretrain', f'--config.pretrain.steps={steps}',
       f'--config.pretrain.log_every={steps // 2}'],
      cwd=root, env=env, capture_output=True, text=True, timeout=1800)
  if proc.returncode:
    raise RuntimeError(f'malloc_speed job failed: {proc.stderr[-1500:]}')
  with open(os.path.join(workdir, 'pretrain', 'metrics.jsonl'), encoding='utf-8') as f:
    last = [json.loads(line) for line in f][-1]
  return {'step_s': last['time/step_s'], 'loss': last['loss']}


def compare_job(*, steps: int = 100, rounds: int = 2) -> dict:
  """`rounds` alternations of the default job's pretrain stage, tuned and system; medians."""
  runs = {name: [] for name in _envs()}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds):
      for name, env in _envs().items():
        runs[name].append(run_job(env, os.path.join(tmp, f'{name}{r}'), steps=steps))
  losses = {name: {x['loss'] for x in rs} for name, rs in runs.items()}
  if losses['tuned'] != losses['system']:
    raise AssertionError(f'the malloc settings changed the loss: {losses}')
  med = {name: statistics.median(x['step_s'] for x in rs) for name, rs in runs.items()}
  return {'steps': steps, 'rounds': rounds, 'tunables': cpu_malloc.MALLOC_TUNABLES,
          'tuned_step_s': med['tuned'], 'system_step_s': med['system'],
          'system_over_tuned': med['system'] / med['tuned'],
          'runs': {name: [x['step_s'] for x in rs] for name, rs in runs.items()}}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--job', action='store_true', help='the default job\'s pretrain stage')
  args = parser.parse_args()
  if args.job:
    r = compare_job(steps=20 if args.quick else 100, rounds=1 if args.quick else 2)
  elif args.quick:
    r = compare(batch=16, steps=3, rounds=1, overrides={'vision_layers': 1, 'text_layers': 1})
  else:
    r = compare()
  print(json.dumps(r, indent=1))


if __name__ == '__main__':
  main()
