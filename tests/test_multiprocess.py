"""The smoke job on 2 processes x 2 CPU devices (jax.distributed on localhost, gloo) against
1 process x 4 devices: the same report and the same D_po, bit for bit; each LLM query asked
once in the whole run; one process writing each shared file; and a pretrain killed on one
process resumes to the uninterrupted parameters.

Bit for bit, because both runs are given the same two things that decide XLA:CPU's float
order. Collectives: the one-process run initialises jax.distributed too, with gloo (XLA's
in-process all-reduce adds a 4-device sum in another order: measured, other last bits, which
training amplifies). Threads: every process gets the same intra-op thread count (PJRT_NPROC,
launch_processes.py), as hosts of one slice have the same cores; without it the IAP head,
trained on one device, got other last bits in a process of 4 devices than of 2 (XLA:CPU's pool
is max(cores, devices) and Eigen's matmul blocking depends on it), and its scores in the
report and D_po moved by up to 1e-6.

The runs are short versions of the smoke job (10 pretrain, 4 align steps), three launches in
all: 1 x 4; 2 x 2 with process 1 killed after pretrain's checkpoint at step 5; the same 2 x 2
job again, which resumes and runs every stage. Every test here is marked `multiprocess`
(deselect with -m "not multiprocess"); the file's time on this 2-core machine is in the README.
Compiling the train steps (~26 s each, both processes at once) is most of it.
"""

import collections
import http.server
import json
import re
import threading

import pytest

import launch_processes
from loopback import PROXY_VARIABLES, chat_answer, send_json

pytestmark = pytest.mark.multiprocess

KEY_ENV = 'AESALIGN_TEST_LLM_KEY'
SHORT = ['--config=configs/default.py:smoke',
         '--config.pretrain.steps=10', '--config.pretrain.checkpoint_every=5',
         '--config.pretrain.log_every=5', '--config.align.steps=4',
         '--config.align.checkpoint_every=2', '--config.align.log_every=2']
TIMING = re.compile(r'(^|_)(seconds|time|elapsed|images_per_s|per_s|wall)($|_)')


class CountingLLM(http.server.ThreadingHTTPServer):
  """An OpenAI-compatible endpoint that rephrases by appending aesthetic words, counting the
  queries it is asked."""
  daemon_threads = True
  # Both processes' clients connect at once (up to max_concurrency each): the default backlog
  # of 5 made the kernel reset connections on a loaded machine (a fallback, not an answer).
  request_queue_size = 64

  def __init__(self):
    super().__init__(('127.0.0.1', 0), _Handler)
    self.calls = collections.Counter()
    self.lock = threading.Lock()

  @property
  def base_url(self):
    return f'http://127.0.0.1:{self.server_address[1]}/v1'

  def __enter__(self):
    threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
    return self

  def __exit__(self, *exc):
    self.shutdown()
    self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):
    pass

  def do_POST(self):
    body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
    query = body['messages'][-1]['content'].rsplit('Query: ', 1)[1]
    with self.server.lock:
      self.server.calls[query] += 1
    send_json(self, 200, chat_answer(f'{query}, sharp, harmonious colours, well framed'))


def _llm_args(server):
  return ['--config.rephrase.backend=openai', '--config.rephrase.model=loopback',
          f'--config.rephrase.base_url={server.base_url}',
          f'--config.rephrase.api_key_env={KEY_ENV}', '--config.rephrase.max_concurrency=4',
          # No retries: a retried request would reach the server twice; every call must
          # succeed the first time (the fallback count below says so).
          '--config.rephrase.max_retries=0']


def _env():
  env = {name: '' for name in PROXY_VARIABLES}
  env[KEY_ENV] = 'sk-loopback'
  return env


def _mining_queries():
  from configs import default
  from input_pipeline import world
  c = default.get_config('smoke')
  queries = [q.text for q in world.World(c.world).mining_queries]
  return queries[:c.mine.max_queries]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The short smoke job on 1 process x 4 devices, and on 2 processes x 2 devices with process
  1 killed (SIGKILL) after pretrain's first checkpoint and the job then run again; each with
  its own counting LLM."""
  root = tmp_path_factory.mktemp('multiprocess')
  out = {}
  with CountingLLM() as llm:
    workdir = root / 'one'
    run = launch_processes.launch([*SHORT, *_llm_args(llm), f'--workdir={workdir}'],
                                  logs=root, name='one', processes=1, devices=4, timeout=400,
                                  env=_env())
    out['one'] = dict(run=run.check(), workdir=workdir, calls=llm.calls)
  workdir = root / 'two'
  checkpoint = workdir / 'pretrain' / 'checkpoints' / '5'
  killed = []

  def kill_after_first_checkpoint(popens):
    if not killed and checkpoint.is_dir() and popens[1].poll() is None:
      popens[1].kill()   # no clean save; process 0 is stopped by the harness
      killed.append(True)

  with CountingLLM() as llm:
    args = [*SHORT, *_llm_args(llm), f'--workdir={workdir}']
    first = launch_processes.launch(args, logs=root, name='killed', processes=2, devices=2,
                                    timeout=300, env=_env(), watch=kill_after_first_checkpoint,
                                    grace=2)
    out['killed'] = dict(run=first, killed=bool(killed),
                         model_written=(workdir / 'pretrain' / 'model').exists())
    run = launch_processes.launch(args, logs=root, name='two', processes=2, devices=2,
                                  timeout=400, env=_env())
    out['two'] = dict(run=run.check(), workdir=workdir, calls=llm.calls)
  return out


def _report(workdir):
  report = json.loads((workdir / 'eval' / 'report.json').read_text())
  report.pop('config')

  def clean(x):
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items() if not TIMING.search(k)}
    if isinstance(x, list):
      return [clean(v) for v in x]
    return x.replace(str(workdir), '<workdir>') if isinstance(x, str) else x
  return clean(report)


def _differences(a, b, path=''):
  """(path, a, b) of every leaf that differs."""
  if isinstance(a, dict) and isinstance(b, dict):
    if set(a) != set(b):
      return [(path, sorted(a), sorted(b))]
    return [d for k in a for d in _differences(a[k], b[k], f'{path}/{k}')]
  if isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      return [(path, len(a), len(b))]
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f'{path}[{i}]')]
  return [] if a == b else [(path, a, b)]


def test_two_processes_write_the_report_of_one_process_with_four_devices(runs):
  # Equal exactly (tolerance 0): the same collectives (gloo) and the same XLA:CPU thread
  # count make every float the same bits - the models, the index, the IAP scores, the ground
  # truth, retrieval, zero-shot and HPIR numbers, the judge's verdicts.
  diffs = _differences(_report(runs['one']['workdir']), _report(runs['two']['workdir']))
  assert diffs == [], diffs[:10]


def test_models_and_corpus_index_are_bit_identical_across_process_counts(runs):
  one, two = runs['one']['workdir'], runs['two']['workdir']
  for name in ('pretrain/model/model.safetensors', 'align/model/model.safetensors'):
    assert (one / name).read_bytes() == (two / name).read_bytes(), name
  # The IAP file's two metadata keys come out in either order (safetensors writes them from a
  # hash map), so its tensors and metadata are compared, not its bytes.
  from safetensors import safe_open
  files = [safe_open(str(w / 'aesthetic' / 'iap.safetensors'), 'numpy') for w in (one, two)]
  assert files[0].metadata() == files[1].metadata()
  assert sorted(files[0].keys()) == sorted(files[1].keys())
  for key in files[0].keys():
    assert files[0].get_tensor(key).tobytes() == files[1].get_tensor(key).tobytes(), key
  shards = sorted(p.name for p in (one / 'mine' / 'index').glob('shard_*.npz'))
  assert len(shards) > 1   # several shards, embedded by both processes
  for name in shards:
    assert (one / 'mine/index' / name).read_bytes() == (two / 'mine/index' / name).read_bytes()


def test_dpo_is_byte_identical_across_process_counts(runs):
  one = (runs['one']['workdir'] / 'mine' / 'dpo.arrayrecord').read_bytes()
  assert len(one) > 0
  assert (runs['two']['workdir'] / 'mine' / 'dpo.arrayrecord').read_bytes() == one


def test_each_mining_query_is_sent_to_the_llm_once_in_the_whole_run(runs):
  mining = _mining_queries()
  for name in ('two', 'one'):
    stage = json.loads((runs[name]['workdir'] / 'mine' / 'stage.json').read_text())
    assert stage['summary']['rephrase']['fallbacks'] == 0, (name, stage['summary']['rephrase'])
    calls = runs[name]['calls']
    asked = {q: n for q, n in calls.items() if q in set(mining)}
    assert asked == {q: 1 for q in mining}, (name, {q: n for q, n in asked.items() if n != 1})
  # Both processes asked: the queries were split, not all sent by one.
  logs = [runs['two']['run'].log(i) for i in (0, 1)]
  assert all('stage mine: started' in log for log in logs)


def test_shared_files_are_written_once(runs):
  two = runs['two']['workdir']
  caches = sorted(p.name for p in (two / 'mine').glob('rephrase_cache*.jsonl'))
  assert caches == ['rephrase_cache.process0-of-2.jsonl', 'rephrase_cache.process1-of-2.jsonl']
  cached = [json.loads(line)['query'] for name in caches
            for line in (two / 'mine' / name).read_text().splitlines()]
  assert sorted(cached) == sorted(_mining_queries())   # each query in one process's cache
  # One process printed the report and the mining summary.
  logs = [runs['two']['run'].log(i) for i in (0, 1)]
  assert ['# aesalign report' in log for log in logs] == [True, False]
  assert ['mining: 60 queries' in log for log in logs] == [True, False]


def test_pretrain_killed_on_one_process_resumes_to_the_uninterrupted_parameters(runs):
  """The 2-process run above was killed after pretrain's first checkpoint and run again: it
  resumed there, and its PT model is the uninterrupted run's bit for bit (the 1-process run,
  whose every number the 2-process path reproduces - the tests above)."""
  first = runs['killed']['run']
  assert runs['killed']['killed'] and first.returncodes[1] != 0, first.tails()
  assert not runs['killed']['model_written'], first.tails()
  again = runs['two']['run']
  assert 'pretrain: resumed from the checkpoint at step 5' in again.log(0), again.tails()
  name = 'pretrain/model/model.safetensors'
  assert (runs['two']['workdir'] / name).read_bytes() == (runs['one']['workdir'] /
                                                          name).read_bytes()
