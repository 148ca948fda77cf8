"""The mutation script itself (benchmarks/mutation.py): its mutants, and that it always puts
the original bytes back."""

import ast

import pytest

from benchmarks import mutation   # from the checkout (pytest's pythonpath)

SNIPPET = '''\
import logging

def f(x: int = 2, flag=True) -> float:
  """Doc 1."""
  if x < 1 and not flag:
    raise ValueError(f"x {x + 1} < 1")
  logging.info("x=%d", x * 3)
  y = -x * 0.5
  y += 1
  return y

def g(x):
  return x == 0
'''


def _mutated_lines(source, scope=None):
  return [(m.line, m.desc, m.apply(source.encode()).decode().splitlines()[m.line - 1].strip())
          for m in mutation.generate(source, scope)]


def test_the_generator_yields_the_fixed_mutants_of_a_snippet():
  assert _mutated_lines(SNIPPET) == [
      (3, '2 -> 3', 'def f(x: int = (3), flag=True) -> float:'),
      (3, 'True -> False', 'def f(x: int = 2, flag=(False)) -> float:'),
      (5, '< -> <=', 'if (x <= 1) and not flag:'),
      (5, 'and -> or', 'if (x < 1 or not flag):'),
      (5, '1 -> 0', 'if x < (0) and not flag:'),
      (5, 'remove not', 'if x < 1 and (flag):'),
      (8, 'remove unary -', 'y = (x) * 0.5'),
      (8, '* -> /', 'y = (-x / 0.5)'),
      (8, '0.5 -> 0.75', 'y = -x * (0.75)'),
      (9, '+= -> -=', 'y -= 1'),
      (9, '1 -> 0', 'y += (0)'),
      (10, 'return None', 'return None'),
      (13, 'return None', 'return None'),
      (13, '== -> !=', 'return (x != 0)'),
      (13, '0 -> 1', 'return x == (1)'),
  ]
  # Left alone: the docstring, the raise (message and f-string), the logging call, the type
  # hints. Every mutant still compiles.
  for m in mutation.generate(SNIPPET):
    ast.parse(m.apply(SNIPPET.encode()))


def test_the_scope_keeps_only_the_named_functions_and_methods():
  source = ('class C:\n  def m(self):\n    return 1\n  def n(self):\n    return 2\n\n'
            'def h():\n  return 3\n')
  assert [(line, desc) for line, desc, _ in _mutated_lines(source, ('C.m', 'h'))] == [
      (3, 'return None'), (3, '1 -> 0'), (8, 'return None'), (8, '3 -> 4')]
  assert len(mutation.generate(source, ('C',))) == 4


def test_columns_are_utf8_bytes():
  source = 'def f():\n  s = "\u00e9\u00e9"; return 1 + 2\n'
  assert [text for _, _, text in _mutated_lines(source)] == [
      's = "\u00e9\u00e9"; return None', 's = "\u00e9\u00e9"; return (0) + 2',
      's = "\u00e9\u00e9"; return (1 - 2)', 's = "\u00e9\u00e9"; return 1 + (3)']


def test_sampling_is_deterministic_and_evenly_spaced():
  items = list(range(10))
  assert mutation.sample(items, 4) == [0, 2, 5, 7]
  assert mutation.sample(items, 0) == items and mutation.sample(items, 20) == items


def test_written_restores_the_original_bytes_and_mtime_even_when_the_block_raises(tmp_path):
  path = tmp_path / 'module.py'
  original = b'x = 1\r\n# \xc3\xa9 no trailing newline'
  path.write_bytes(original)
  mtime = path.stat().st_mtime_ns
  for error in (RuntimeError, KeyboardInterrupt):
    with pytest.raises(error):
      with mutation.written(path, b'x = 0\n'):
        assert path.read_bytes() == b'x = 0\n'
        raise error('the test run failed')
    assert path.read_bytes() == original
    assert path.stat().st_mtime_ns == mtime
  assert sorted(p.name for p in tmp_path.iterdir()) == ['module.py']


def test_run_target_restores_the_file_when_the_runner_raises(tmp_path, monkeypatch):
  source = b'def f(x):\n  return x + 1\n'
  (tmp_path / 'm.py').write_bytes(source)
  monkeypatch.setitem(mutation.TARGETS, 'toy', mutation.Target('m.py', ('f',), ('t.py',)))
  calls = []

  def run(job):
    calls.append(job)
    if len(calls) == 1:
      return dict(status='passed', seconds=1.0, tail='', lines={})   # the baseline
    assert (tmp_path / 'm.py').read_bytes() != source
    raise KeyboardInterrupt

  mutants = mutation.generate(source, ('f',))
  with pytest.raises(KeyboardInterrupt):
    mutation.run_target('toy', mutation.TARGETS['toy'], tmp_path, mutants, run=run,
                        log=lambda *a: None)
  assert (tmp_path / 'm.py').read_bytes() == source and len(calls) == 2


def test_run_target_counts_failures_and_timeouts_as_kills(tmp_path):
  source = b'def f(x):\n  return x + 1\n'
  (tmp_path / 'm.py').write_bytes(source)
  target = mutation.Target('m.py', ('f',), ('t.py',))
  answers = iter(['passed', 'failed', 'timeout', 'passed'])
  jobs = []

  def run(job):
    jobs.append(job)
    return dict(status=next(answers), seconds=1.0, tail='', lines={'t.py::a': [1], 't.py::b': [2]})

  record = mutation.run_target('toy', target, tmp_path, mutation.generate(source), run=run,
                               log=lambda *a: None)
  assert [(r['desc'], r['status'], r['timeout']) for r in record['results']] == [
      ('return None', 'killed', False), ('+ -> -', 'killed', True),
      ('1 -> 0', 'survived', False)]
  # The baseline is traced; each mutant's run puts the tests that execute its line first.
  assert jobs[0]['trace'] == 'm.py' and all(j['first'] == ['t.py::b'] for j in jobs[1:])
  assert mutation.score('toy', record)['score'] == pytest.approx(2 / 3)
  # A later run's results replace the earlier ones of the same mutants (a --rerun).
  rerun = dict(record, results=[dict(record['results'][2], status='killed')])
  after = mutation.merged([dict(targets={'toy': record}), dict(targets={'toy': rerun})])
  assert mutation.score('toy', after['toy'])['score'] == 1.0
  assert (tmp_path / 'm.py').read_bytes() == source


@pytest.mark.parametrize('name', sorted(mutation.TARGETS))
def test_every_target_names_functions_of_its_file(name):
  target = mutation.TARGETS[name]
  tree = ast.parse((mutation.REPO / target.path).read_bytes())
  defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
  assert set(target.scope) <= defined
  assert mutation.generate((mutation.REPO / target.path).read_bytes(), target.scope)


def test_the_fork_server_runs_traces_orders_and_times_out(tmp_path):
  (tmp_path / 'benchmarks').mkdir()
  (tmp_path / 'benchmarks' / '__init__.py').write_text('')
  (tmp_path / 'benchmarks' / 'mutation.py').write_bytes(
      (mutation.REPO / 'benchmarks' / 'mutation.py').read_bytes())
  (tmp_path / 'toy.py').write_text('def f(x):\n  return x + 1\n\ndef g(x):\n  return x * 2\n')
  (tmp_path / 'test_toy.py').write_text(
      'import toy\n\ndef test_g():\n  assert toy.g(2) == 4\n\n'
      'def test_f():\n  assert toy.f(1) == 2\n')
  server = mutation.ForkServer(tmp_path)
  try:
    tests = ['test_toy.py']
    baseline = server.run(dict(tests=tests, timeout=120, trace='toy.py'))
    assert baseline['status'] == 'passed'
    assert baseline['lines'] == {'test_toy.py::test_g': [5], 'test_toy.py::test_f': [2]}
    with mutation.written(tmp_path / 'toy.py', b'def f(x):\n  return x - 1\n\ndef g(x):\n'
                          b'  return x * 2\n'):
      failed = server.run(dict(tests=tests, timeout=120, first=['test_toy.py::test_f']))
    assert failed['status'] == 'failed'
    assert '1 failed' in failed['tail'] and 'passed' not in failed['tail']   # test_f ran first
    with mutation.written(tmp_path / 'toy.py', b'def f(x):\n  while True: pass\n\ndef g(x):\n'
                          b'  return x * 2\n'):
      assert server.run(dict(tests=tests, timeout=3, first=[]))['status'] == 'timeout'
    assert server.run(dict(tests=tests, timeout=120))['status'] == 'passed'
  finally:
    server.close()
  assert server.proc.poll() is not None
