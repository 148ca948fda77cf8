"""Launches main.py as P processes x D CPU devices on this machine, the way a multi-host slice
runs it: jax.distributed over a free localhost port, gloo collectives, each process with its
own process_id. Bounded in time; when one process fails the others are stopped (they would
wait for it in a collective), and every process's log is kept for the failure message.

    run = launch(['--config=configs/default.py:smoke', f'--workdir={w}'], logs=tmp_path,
                 processes=2, devices=2, timeout=300)
    run.check()                       # fails the test with both logs' tails unless all exit 0
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Run:
  returncodes: list
  logs: list          # paths of the processes' logs (stdout and stderr together)
  seconds: float
  timed_out: bool

  def log(self, i: int) -> str:
    with open(self.logs[i], encoding='utf-8', errors='replace') as f:
      return f.read()

  def tails(self, chars: int = 3000) -> str:
    return '\n'.join(f'--- process {i} (exit {rc}), {path} ---\n{self.log(i)[-chars:]}'
                     for i, (rc, path) in enumerate(zip(self.returncodes, self.logs)))

  def check(self):
    assert not self.timed_out and all(rc == 0 for rc in self.returncodes), (
        f'{"timed out after %.0f s; " % self.seconds if self.timed_out else ""}'
        f'exit codes {self.returncodes}\n{self.tails()}')
    return self


def launch(args: list, *, logs, processes: int = 2, devices: int = 2, timeout: float = 600,
           env: Optional[dict] = None, name: str = 'run',
           watch: Optional[Callable[[list], None]] = None, grace: float = 10.0,
           same_collectives: bool = True, threads: Optional[int] = None) -> Run:
  """Runs `python main.py *args` as `processes` processes of `devices` CPU devices each.

  logs: folder for the logs (<name>.process<i>.log). watch(popens): called every 0.2 s while
  they run (e.g. to kill one). A process that exits non-zero gets the others stopped after
  `grace` seconds; past `timeout` all are killed (timed_out). same_collectives: a single
  process initialises jax.distributed too, with gloo, so that its cross-device sums are the
  multi-process run's, bit for bit. threads: XLA:CPU's intra-op thread count in every
  process (default: the global device count, so that it is the same for every split of the
  same devices)."""
  os.makedirs(logs, exist_ok=True)
  port = free_port()
  base_env = dict(os.environ, **(env or {}))
  base_env['JAX_PLATFORMS'] = 'cpu'
  base_env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  # XLA:CPU's thread pool has max(cores, local devices) threads, and Eigen's matmul blocking
  # depends on it: measured, the IAP head trained on one device gets other last bits in a
  # process of 4 devices than of 2 on this 2-core machine. Hosts of one slice have the same
  # cores; PJRT_NPROC (read by PJRT's DefaultThreadPoolSize) makes these processes alike.
  base_env['PJRT_NPROC'] = str(threads or processes * devices)
  popens, paths = [], []
  for i in range(processes):
    command = [sys.executable, os.path.join(ROOT, 'main.py'), *args]
    # One process too: the same gloo collectives as the multi-process run (XLA's in-process
    # all-reduce sums in another order: measured, the last bits of a 4-device sum differ).
    if processes > 1 or same_collectives:
      command += [f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                  f'--config.distributed.num_processes={processes}',
                  f'--config.distributed.process_id={i}',
                  '--config.distributed.cpu_collectives=gloo']
    path = os.path.join(logs, f'{name}.process{i}.log')
    paths.append(path)
    with open(path, 'w', encoding='utf-8') as out:
      popens.append(subprocess.Popen(command, cwd=ROOT, env=base_env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True))
  start, failed_at, timed_out = time.time(), None, False
  while any(p.poll() is None for p in popens):
    if watch is not None:
      watch(popens)
    if failed_at is None and any(p.poll() not in (None, 0) for p in popens):
      failed_at = time.time()
    if failed_at is not None and time.time() - failed_at > grace:
      _kill_all(popens)
    if time.time() - start > timeout:
      timed_out = True
      _kill_all(popens)
    time.sleep(0.2)
  return Run([p.returncode for p in popens], paths, time.time() - start, timed_out)


def _kill_all(popens):
  for p in popens:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)   # its own session: the process and its children
      p.wait()
