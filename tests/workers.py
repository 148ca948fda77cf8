"""Runs a test worker script (tests/<name>.py, e.g. on fake CPU devices) in a subprocess."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_worker(script: str, *args: str, timeout: int = 600) -> list[dict]:
  """The JSON objects the worker prints on stdout, one per line (other output, e.g. progress
  lines, is passed over); fails the test with the worker's stderr if it fails."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join(HERE, script), *args],
                       capture_output=True, text=True, env=env, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
