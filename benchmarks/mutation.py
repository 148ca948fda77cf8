"""Mutation testing of the modules that carry the method's math and bookkeeping (issue 13).

  python -m benchmarks.mutation [--module NAME[,NAME]] [--max N] [--out FILE.json]
                                [--list] [--rerun FILE.json] [--report FILE.json ...]

Each target (TARGETS) is a source file, the functions in it that hold the logic, and the fast
test selection that guards them. Its mutants are a fixed, deterministic list made with `ast`:
comparison swaps (< <=, > >=, == !=, is / is not, in / not in), arithmetic swaps (+ -, * /,
// -> /, ** -> *, & |, in augmented assignments too), constant tweaks (0 -> 1, 1 -> 0,
n -> n+1 for 2 <= n <= 16, 0.0 -> 1.0, other floats c -> 1.5c, True <-> False), and / or
swaps, removal of `not`, unary minus and `~`, and `return x` -> `return None`. Left alone:
strings (docstrings, messages), f-strings, logging calls, `raise` statements, type hints.

The checkout is never mutated: the working tree (without .git, .venv, workdir and caches) is
copied once to a temporary folder, each mutant is written over the file there, the selection
runs there (`pytest -x -q -p no:cacheprovider`, no bytecode written, so no stale .pyc of one
mutant can serve the next), and the file's original bytes go back in a `finally`; the folder
is deleted at the end, on Ctrl-C and on SIGTERM too. A failing run, or one past the timeout
(3x the baseline + 30 s), kills the mutant.

Speed: a fork server in the copy imports jax and pytest once and forks a child per run. Each
selection first runs unmutated and traced: it must pass (else the target is reported and
skipped), it sets the timeout, and it records which tests execute which lines; a mutant's run
puts the tests that execute its line first, so that it usually dies within a second or two
(survivors still run the whole selection). --max N keeps N mutants per target, evenly spaced
over the list (deterministic).

EQUIVALENT names the survivors judged equivalent or harmless, each with its reason; a
target's score is killed / (mutants - those). --rerun runs again only a result file's
survivors (after new tests); --resume reuses an interrupted run's results (--out is written
after every mutant); --report prints the table of result files, a later file's
results replacing an earlier one's (the full run, then the rerun).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Target:
  path: str              # relative to the repository root
  scope: tuple           # qualified names (function, Class, Class.method) that are mutated
  tests: tuple           # pytest arguments of the selection that guards them


TARGETS = {
    # clip_infonce_sharded is left out: its test (test_contrastive_sharded) needs a
    # multi-device subprocess, far over a per-mutant budget.
    'losses': Target('aesalign_jax/losses.py', (
        '_as_float', '_static_number', '_l2_normalize', '_check_embeddings', 'clip_infonce',
        'siglip_loss', 'validate_dpo_args', 'preference_loss', '_check_dpo_shapes',
        'ranked_dpo', 'pairwise_dpo_reference', 'pair_mask'),
        ('tests/test_losses.py',)),
    # load_queries (reading a query file) is input parsing, tested with the stages.
    'mining': Target('aesalign_jax/mining.py', (
        'RowScores', 'validate', 'grid_pick', 'mine', '_world_measures'),
        ('tests/test_mining.py', 'tests/test_mining_mutants.py',
         '-k', 'not world_mining')),   # the world test pretrains a model first (70 s)
    # The D_po record and its files; the grain pipeline that feeds training is not the record.
    'preference': Target('input_pipeline/preference.py', (
        'positive_int', '_text', '_scores', 'PreferenceGroup', 'as_group', '_format_of',
        'GroupWriter', 'write_groups', 'PreferenceGroupSource', '_read_records', 'open_groups',
        '_check_expected_uv'),
        ('tests/test_preference.py',)),
    'hpir': Target('aesalign_jax/evaluation/hpir.py', (
        'AspectLabel', 'model_choices', 'score_choices', 'group_similarities', 'score_hpir'),
        ('tests/test_hpir.py', 'tests/test_hpir_world.py')),
    'judge_protocol': Target('aesalign_jax/evaluation/judge_protocol.py', (
        'preferred_system', 'outcome', 'judge_systems', '_one_call'),
        ('tests/test_judge.py',)),
    'judge': Target('aesalign_jax/evaluation/judge.py', (
        'choose', 'WorldJudge', 'ScorerJudge', '_mean', '_check_margins'),
        ('tests/test_judge.py',)),
}

# Survivors judged equivalent or harmless: (target, source line stripped, mutation) -> why.
_SQUARE = 'the logits are [B, B]: shape[0] == shape[1]'
_TWO_D = 'the arrays are 2-D (embeddings checked [B, D]): axis 1 is axis -1'
EQUIVALENT = {
    ('losses', 'def _l2_normalize(x, eps=1e-12):', '1e-12 -> 1.5e-12'):
        'the floor only guards an all-zero vector',
    ('losses', 'return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), '
     'eps * eps))', 'remove unary -'): _TWO_D,
    ('losses', 'logp = jax.nn.log_softmax(lg, axis=-1)', 'remove unary -'): _TWO_D,
    ('losses', 'uniform = -jnp.mean(logp, axis=-1)', 'remove unary -'): _TWO_D,
    ('losses', 'uniform = -jnp.mean(logp, axis=-1)', '1 -> 0'):
        'the loss then means over all entries: by rows or by columns first, the same',
    ('losses', 'labels = jnp.arange(logits.shape[0])', '0 -> 1'): _SQUARE,
    ('losses', 'signs = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0', '0 -> 1'):
        _SQUARE,
    ('losses', 'loss = jnp.mean(-jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1))',
     'remove unary -'): _TWO_D,
    ('losses', 'loss = jnp.mean(-jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1))',
     '1 -> 0'): 'the mean of row sums and of column sums of a square matrix are both total / B',
    ('mining', "summary['seconds'] = round(time.time() - start, 2)", '2 -> 3'):
        'the rounding of a reported duration',
    ('preference', '@dataclasses.dataclass(frozen=True, eq=False)', 'False -> True'):
        'the class defines __eq__, which dataclass keeps; hash() raises TypeError either way',
    ('preference', 'self._writer.write(json.dumps(payload, allow_nan=False).encode("utf-8"))',
     'False -> True'): 'scores and meta are checked finite on construction: no NaN gets here',
    ('preference', 'payload["meta"] = json.dumps(payload["meta"], allow_nan=False)',
     'False -> True'): 'meta is checked finite on construction: no NaN gets here',
    ('preference', 'if len(self._rows) >= self.PARQUET_ROWS_PER_GROUP:', '>= -> >'):
        'Parquet row groups of 1025 rows, not 1024: the layout, not the data',
    ('judge_protocol', 'p1, p2 = preferred_system(choice_1, 1), preferred_system(choice_2, 2)',
     '2 -> 3'): 'preferred_system tells call 1 from any other call',
    ('judge_protocol', 'calls = [(i, call) for i in range(len(queries)) for call in (1, 2)]',
     '2 -> 3'): 'run() shows system 2 as A for any call but 1',
    ('judge_protocol', 'if workers == 1:', '1 -> 0'):
        'a pool of one worker gives the same answers in order; the plain loop saves a thread',
    ('judge', 'if abs(diff) <= margin + _TOLERANCE:', '<= -> <'):
        'differs only when |diff| is exactly margin + 1e-9, the rounding allowance itself',
    ('judge', 'return "A" if diff > 0 else "B"', '> -> >='):
        'diff == 0 never gets here: it is within any margin (>= 0), so "similar"',
}


# ------------------------------------------------------------------------------ mutants

_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
         ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Add: ast.Sub, ast.Sub: ast.Add,
         ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div, ast.Pow: ast.Mult,
         ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.And: ast.Or, ast.Or: ast.And}
_SYMBOL = {ast.Lt: '<', ast.LtE: '<=', ast.Gt: '>', ast.GtE: '>=', ast.Eq: '==',
           ast.NotEq: '!=', ast.Is: 'is', ast.IsNot: 'is not', ast.In: 'in',
           ast.NotIn: 'not in', ast.Add: '+', ast.Sub: '-', ast.Mult: '*', ast.Div: '/',
           ast.FloorDiv: '//', ast.Pow: '**', ast.BitAnd: '&', ast.BitOr: '|', ast.And: 'and',
           ast.Or: 'or', ast.Not: 'not', ast.USub: 'unary -', ast.Invert: '~'}
_LOGGERS = ('logging', 'logger', 'log')
PYTEST_FLAGS = ('-x', '-q', '-p', 'no:cacheprovider')


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One change of the source: bytes [start, end) replaced by `text`."""
  line: int
  end_line: int
  col: int
  start: int
  end: int
  kind: str    # compare | arith | constant | boolean | unary | return
  desc: str    # e.g. '< -> <='
  text: str

  def apply(self, source: bytes) -> bytes:
    return source[:self.start] + self.text.encode('utf-8') + source[self.end:]


def _changes(node):
  """(kind, desc, replacement node, is a statement) for each mutant of this one node."""
  sym = lambda op: _SYMBOL[type(op)]  # noqa: E731
  if isinstance(node, ast.Compare):
    for i, op in enumerate(node.ops):
      if type(op) in _SWAP:
        ops = list(node.ops)
        ops[i] = _SWAP[type(op)]()
        yield 'compare', f'{sym(op)} -> {sym(ops[i])}', ast.Compare(node.left, ops,
                                                                    node.comparators), False
  elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _SWAP:
    new = _SWAP[type(node.op)]()
    desc = f'{sym(node.op)} -> {sym(new)}'
    if isinstance(node, ast.BinOp):
      yield 'arith', desc, ast.BinOp(node.left, new, node.right), False
    else:
      yield 'arith', desc.replace(' ->', '= ->') + '=', ast.AugAssign(node.target, new,
                                                                      node.value), True
  elif isinstance(node, ast.BoolOp):
    new = _SWAP[type(node.op)]()
    yield 'boolean', f'{sym(node.op)} -> {sym(new)}', ast.BoolOp(new, node.values), False
  elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
    yield 'unary', f'remove {sym(node.op)}', node.operand, False
  elif isinstance(node, ast.Constant) and type(node.value) in (bool, int, float):
    value = node.value
    if isinstance(value, bool):
      new = not value
    elif isinstance(value, int):
      new = {0: 1, 1: 0}.get(value, value + 1 if 2 <= value <= 16 else None)
    else:
      new = 1.0 if value == 0 else value * 1.5
    if new is not None:
      yield 'constant', f'{value!r} -> {new!r}', ast.Constant(new), False
  elif isinstance(node, ast.Return) and node.value is not None and not (
      isinstance(node.value, ast.Constant) and node.value.value is None):
    yield 'return', 'return None', ast.Return(ast.Constant(None)), True


def _skipped(node) -> bool:
  """Raise statements, f-strings and logging calls: their mutants only change messages."""
  if isinstance(node, (ast.Raise, ast.JoinedStr)):
    return True
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
    owner = node.func.value
    return isinstance(owner, ast.Name) and owner.id in _LOGGERS
  return False


def generate(source: str | bytes, scope=None) -> list[Mutant]:
  """The mutants of `source`, in source order; `scope`: qualified names to mutate (None: all)."""
  data = source.encode('utf-8') if isinstance(source, str) else source
  starts = [0]
  for line in data.splitlines(keepends=True):
    starts.append(starts[-1] + len(line))
  offset = lambda line, col: starts[line - 1] + col  # noqa: E731  (ast columns are bytes)
  out = []

  def visit(node, qual):
    if _skipped(node):
      return
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      qual = f'{qual}.{node.name}' if qual else node.name
    if scope is None or any(qual == s or qual.startswith(s + '.') for s in scope):
      for kind, desc, new, statement in _changes(node):
        text = ast.unparse(new) if statement else f'({ast.unparse(new)})'
        out.append(Mutant(node.lineno, node.end_lineno, node.col_offset,
                          offset(node.lineno, node.col_offset),
                          offset(node.end_lineno, node.end_col_offset), kind, desc, text))
    for field, value in ast.iter_fields(node):
      if field in ('annotation', 'returns'):   # type hints
        continue
      for child in value if isinstance(value, list) else [value]:
        if isinstance(child, ast.AST):
          visit(child, qual)

  visit(ast.parse(data), '')
  return sorted(out, key=lambda m: (m.start, m.end, m.desc))


def sample(mutants: list, n: int | None) -> list:
  """At most n of `mutants`, evenly spaced (deterministic)."""
  if not n or n >= len(mutants):
    return list(mutants)
  return [mutants[i * len(mutants) // n] for i in range(n)]


# ------------------------------------------------------------------------------ running

def _write(path: Path, data: bytes) -> None:
  tmp = path.with_name(f'.{path.name}.mutation-tmp')
  tmp.write_bytes(data)
  os.replace(tmp, path)


@contextlib.contextmanager
def written(path: str | os.PathLike, data: bytes):
  """`data` over the file at `path` for the block; its original bytes and mtime go back
  afterwards, whatever the block raises (KeyboardInterrupt included)."""
  path = Path(path)
  original, stat = path.read_bytes(), path.stat()
  try:
    _write(path, data)
    yield path
  finally:
    _write(path, original)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# Third-party modules the fork server imports once (never the project's own: each run must
# import the mutated file afresh). Importing jax starts no backend, so forking after it is safe.
PRELOAD = ('pytest', 'numpy', 'jax', 'jax.numpy', 'flax.linen', 'optax', 'grain',
           'ml_collections', 'absl.flags', 'pyarrow.parquet', 'PIL.Image')


class _Order:
  """pytest plugin: the tests named in `first` run before the others (each part in file
  order), so that a mutant dies at its first failing test rather than at the end of a file."""

  def __init__(self, first):
    self.first = set(first)

  def pytest_collection_modifyitems(self, items):
    items.sort(key=lambda item: item.nodeid not in self.first)


class _Lines:
  """pytest plugin: per test (setup, call, teardown), the lines of one file it executes."""

  def __init__(self, path: str):
    self.suffix, self.lines, self.current = os.sep + path, {}, None
    sys.settrace(self._call)
    threading.settrace(self._call)

  def _call(self, frame, event, arg):
    if self.current is None or not frame.f_code.co_filename.endswith(self.suffix):
      return None
    return self._line

  def _line(self, frame, event, arg):
    if event == 'line' and self.current is not None:
      self.current.add(frame.f_lineno)
    return self._line

  def pytest_runtest_logstart(self, nodeid):
    self.current = self.lines.setdefault(nodeid, set())

  def pytest_runtest_logfinish(self):
    self.current = None


def _child(job: dict, log) -> None:
  """In the forked child: pytest on the job, output to `log`, exit with pytest's code."""
  import pytest  # pylint: disable=g-import-not-at-top  (preloaded by serve)
  os.setpgid(0, 0)   # its own group, so that a timeout also ends the workers a test starts
  os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
  os.dup2(log.fileno(), 1)
  os.dup2(log.fileno(), 2)
  rc = 3
  try:
    plugins = [_Order(job.get('first', ()))]
    if job.get('trace'):
      plugins.append(_Lines(job['trace']))
    rc = int(pytest.main([*PYTEST_FLAGS, *job['tests']], plugins=plugins))
    if job.get('trace'):
      Path(job['trace_out']).write_text(json.dumps(
          {k: sorted(v) for k, v in plugins[1].lines.items()}))
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def serve() -> None:
  """The fork server (ForkServer starts it in the copy): preloads PRELOAD, then per stdin
  line (a job: tests, timeout, first, trace) forks a child that runs pytest, and answers one
  JSON line: status ('passed' | 'failed' | 'timeout'), seconds, output tail, lines (traced)."""
  import importlib  # pylint: disable=g-import-not-at-top
  for name in PRELOAD:
    with contextlib.suppress(ImportError):
      importlib.import_module(name)
  child = None

  def stop(signum, frame):
    if child:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(child, signal.SIGKILL)
    os._exit(1)

  signal.signal(signal.SIGTERM, stop)
  for line in sys.stdin:
    job = json.loads(line)
    log = tempfile.TemporaryFile()
    if job.get('trace'):
      fd, job['trace_out'] = tempfile.mkstemp(suffix='.json')
      os.close(fd)
    start = time.perf_counter()
    child = os.fork()
    if child == 0:
      _child(job, log)
    deadline, status = start + job['timeout'], 'timeout'
    while time.perf_counter() < deadline:
      pid, code = os.waitpid(child, os.WNOHANG)
      if pid:
        status = 'passed' if os.waitstatus_to_exitcode(code) == 0 else 'failed'
        break
      time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):   # a timeout, or workers left behind
      os.killpg(child, signal.SIGKILL)
    if status == 'timeout':
      os.waitpid(child, 0)
    child = None
    answer = dict(status=status, seconds=time.perf_counter() - start)
    log.seek(0)
    answer['tail'] = log.read().decode('utf-8', 'replace')[-3000:]
    log.close()
    if job.get('trace'):
      traced = Path(job['trace_out'])
      answer['lines'] = json.loads(traced.read_text() or '{}')
      traced.unlink()
    print(json.dumps(answer), flush=True)


class ForkServer:
  """run(job) -> answer (see serve), in a server that imported jax and pytest once."""

  def __init__(self, root: Path):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1')   # no stale .pyc of a mutant
    self.proc = subprocess.Popen(
        [sys.executable, '-c', 'from benchmarks import mutation; mutation.serve()'], cwd=root,
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True)

  def run(self, job: dict) -> dict:
    self.proc.stdin.write(json.dumps(job) + '\n')
    self.proc.stdin.flush()
    answer = self.proc.stdout.readline()
    if not answer:
      raise RuntimeError(f'the fork server exited ({self.proc.poll()})')
    return json.loads(answer)

  def close(self) -> None:
    self.proc.terminate()   # its SIGTERM handler ends a running child first
    try:
      self.proc.wait(10)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()


def snapshot(dest: Path) -> Path:
  """A copy of the working tree to mutate, without git, the venv, run outputs and caches."""
  tree = dest / 'tree'
  shutil.copytree(REPO, tree, symlinks=True, ignore=shutil.ignore_patterns(
      '.git', '.venv', 'workdir*', '__pycache__', '*.egg-info', '.pytest_cache'))
  probe = subprocess.run([sys.executable, '-c', 'import aesalign_jax, input_pipeline; '
                          'print(aesalign_jax.__file__, input_pipeline.__file__)'],
                         cwd=tree, capture_output=True, text=True, check=True).stdout.split()
  if not all(Path(p).resolve().is_relative_to(tree.resolve()) for p in probe):
    raise RuntimeError(f'the copy at {tree} would import the checkout: {probe}')
  return tree


def run_target(name: str, target: Target, tree: Path, mutants: list, *, run, known=None,
               saved=lambda record: None, log=functools.partial(print, flush=True)) -> dict:
  """The baseline (traced: which test runs which line), then every mutant, the tests that
  run its lines first; `run`: ForkServer(tree).run. Returns the target's JSON record, also
  handed to `saved` after each mutant. `known`: earlier results by (line, col, desc), reused."""
  path = tree / target.path
  source = path.read_bytes()
  answer = run(dict(tests=target.tests, timeout=1800, trace=target.path))
  record = dict(path=target.path, tests=list(target.tests),
                baseline_s=round(answer['seconds'], 1),
                mutants_total=len(generate(source, target.scope)), results=[])
  if answer['status'] != 'passed':
    log(f'{name}: the unmutated selection {answer["status"]}; skipped\n{answer["tail"]}')
    record['baseline'] = answer['status']
    return record
  timeout = 3 * answer['seconds'] + 30
  record.update(baseline='passed', timeout_s=round(timeout))
  covers = answer.get('lines', {})
  lines = source.decode('utf-8').splitlines()
  for i, m in enumerate(mutants):
    if (m.line, m.col, m.desc) in (known or {}):
      record['results'].append(known[m.line, m.col, m.desc])
      continue
    first = [t for t, ls in covers.items() if any(m.line <= x <= m.end_line for x in ls)]
    mutated = m.apply(source)
    with written(path, mutated):
      answer = run(dict(tests=target.tests, timeout=timeout, first=first))
    line_text = lines[m.line - 1].strip()
    result = dict(line=m.line, col=m.col, kind=m.kind, desc=m.desc, line_text=line_text,
                  mutated_line=mutated.decode('utf-8').splitlines()[m.line - 1].strip(),
                  status='survived' if answer['status'] == 'passed' else 'killed',
                  timeout=answer['status'] == 'timeout', covered=bool(first),
                  seconds=round(answer['seconds'], 1))
    record['results'].append(result)
    saved(record)
    log(f'{name} {i + 1}/{len(mutants)} {target.path}:{m.line} {m.desc}: {result["status"]}'
        f'{" (timeout)" if result["timeout"] else ""} {answer["seconds"]:.1f} s')
  if path.read_bytes() != source:
    raise RuntimeError(f'{path} was not restored')
  return record


def equivalent(name: str, result: dict) -> str | None:
  """Why a survivor is equivalent or harmless (EQUIVALENT), or None."""
  if result['status'] != 'survived':
    return None
  return EQUIVALENT.get((name, result['line_text'], result['desc']))


def score(name: str, record: dict) -> dict:
  results = record['results']
  killed = sum(r['status'] == 'killed' for r in results)
  same = sum(bool(equivalent(name, r)) for r in results)
  counted = len(results) - same
  return dict(mutants=len(results), killed=killed, survived=len(results) - killed,
              equivalent=same, score=killed / counted if counted else float('nan'))


def merged(runs: list) -> dict:
  """The targets of several result files, a later file's results replacing an earlier one's
  for the same mutant (e.g. a full run, then --rerun of its survivors after new tests)."""
  records = {}
  for run in runs:
    for name, record in run['targets'].items():
      if name not in records:
        records[name] = dict(record, results=list(record['results']))
        continue
      index = {(r['line'], r['col'], r['desc']): i
               for i, r in enumerate(records[name]['results'])}
      for r in record['results']:
        key = (r['line'], r['col'], r['desc'])
        if key in index:
          records[name]['results'][index[key]] = r
        else:
          records[name]['results'].append(r)
  return records


def table(records: dict) -> str:
  """The per-module scores (Markdown) and the survivors, each equivalent one with its reason."""
  rows = ['| module | mutants | killed | survived | equivalent | score |',
          '|---|---|---|---|---|---|']
  survivors = []
  for name, record in records.items():
    if record.get('baseline') != 'passed':
      rows.append(f'| {record["path"]} | baseline {record.get("baseline")} | | | | |')
      continue
    s = score(name, record)
    rows.append(f'| {record["path"]} | {s["mutants"]} of {record["mutants_total"]} | '
                f'{s["killed"]} | {s["survived"]} | {s["equivalent"]} | {s["score"]:.1%} |')
    for r in record['results']:
      if r['status'] == 'survived':
        why = equivalent(name, r)
        survivors.append(f'{record["path"]}:{r["line"]}  {r["desc"]}  `{r["mutated_line"]}`'
                         + (f'  [equivalent: {why}]' if why else ''))
  return '\n'.join(rows + ['', f'Survivors ({len(survivors)}):'] + survivors)


def _interrupt(signum, frame):
  raise KeyboardInterrupt(f'signal {signum}')   # so every `finally` restores and cleans up


def chosen_mutants(names, *, rerun: str = '', max_per_module: int = 0) -> dict:
  """{target name: its mutants}: all, a --rerun file's survivors, at most --max of them."""
  previous = json.loads(Path(rerun).read_text())['targets'] if rerun else None
  chosen = {}
  for name in names:
    target = TARGETS[name]
    mutants = generate((REPO / target.path).read_bytes(), target.scope)
    if previous is not None:
      keep = {(r['line'], r['col'], r['desc']) for r in previous.get(name, {}).get('results', [])
              if r['status'] == 'survived'}
      mutants = [m for m in mutants if (m.line, m.col, m.desc) in keep]
    chosen[name] = sample(mutants, max_per_module)
  return chosen


def run_all(chosen: dict, *, out: str = '', resume: str = '', meta=None) -> dict:
  """Runs the chosen mutants in a copy of the tree; writes `out` after every mutant."""
  start, records = time.time(), {}
  resumed = merged([json.loads(Path(resume).read_text())]) if resume else {}

  def save(name=None, record=None):
    if name:
      records[name] = record
    if out:
      Path(out).write_text(json.dumps(dict(
          meta or {}, date=datetime.date.today().isoformat(),
          seconds=round(time.time() - start), targets=records), indent=1) + '\n')

  with tempfile.TemporaryDirectory(prefix='aesalign-mutation-') as tmp:
    tree = snapshot(Path(tmp))
    server = ForkServer(tree)
    try:
      for name, mutants in chosen.items():
        known = {(r['line'], r['col'], r['desc']): r
                 for r in resumed.get(name, {}).get('results', ())}
        save(name, run_target(name, TARGETS[name], tree, mutants, run=server.run, known=known,
                              saved=functools.partial(save, name)))
    finally:
      server.close()
  return records


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--module', default='', help=f'comma-separated of {", ".join(TARGETS)}')
  parser.add_argument('--max', type=int, default=0, help='mutants per module (0 = all)')
  parser.add_argument('--out', default='', help='JSON file for the results')
  parser.add_argument('--list', action='store_true', help='print the mutants, run nothing')
  parser.add_argument('--rerun', default='', help='run only the survivors of this JSON file')
  parser.add_argument('--resume', default='', help="reuse an interrupted run's JSON file")
  parser.add_argument('--report', nargs='+', default=(),
                      help='print the table of these result files (later ones win), run nothing')
  args = parser.parse_args(argv)
  if args.report:
    print(table(merged([json.loads(Path(f).read_text()) for f in args.report])))
    return 0
  names = [n for n in args.module.split(',') if n] or list(TARGETS)
  unknown = [n for n in names if n not in TARGETS]
  if unknown:
    parser.error(f'unknown module(s) {unknown}; known: {list(TARGETS)}')
  chosen = chosen_mutants(names, rerun=args.rerun, max_per_module=args.max)
  if args.list:
    for name, mutants in chosen.items():
      source = (REPO / TARGETS[name].path).read_bytes()
      for m in mutants:
        line = m.apply(source).decode('utf-8').splitlines()[m.line - 1].strip()
        print(f'{name} {TARGETS[name].path}:{m.line} {m.kind} {m.desc}: {line}')
      print(f'{name}: {len(mutants)} mutants')
    return 0
  signal.signal(signal.SIGTERM, _interrupt)
  if args.rerun:   # only the targets with survivors left
    chosen = {name: mutants for name, mutants in chosen.items() if mutants}
  start = time.time()
  records = run_all(chosen, out=args.out, resume=args.resume,
                    meta=dict(argv=sys.argv[1:] if argv is None else argv, max=args.max))
  print(table(records))
  print(f'\n{time.time() - start:.0f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
