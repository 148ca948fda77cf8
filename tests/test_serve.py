"""The search over a finished run (aesalign_jax/search.py), its web server (serve.py) and CLI:
the same answers through the Python function, the API, the page in a real browser and the
command line; every bad input answered 4xx with its message; nothing served from outside the
corpus root; a workdir without its models refused at start, naming the stage."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from absl import flags
from fastapi.testclient import TestClient

from conftest import ROOT, run_main

flags.FLAGS.mark_as_parsed()

QUERY = 'a red circle'


@pytest.fixture(scope='module')
def served(smoke_workdir, tmp_path_factory):
  """(engine, workdir): the search opened in this process on a copy of the smoke run (the
  first open writes serve/aligned_index into the copy, never into the shared run)."""
  from aesalign_jax import search
  from configs import default
  workdir = tmp_path_factory.mktemp('served') / 'run'
  shutil.copytree(smoke_workdir[0], workdir, ignore=shutil.ignore_patterns('checkpoints'))
  engine = search.open_run(default.get_config('smoke'), str(workdir))
  yield engine, workdir
  engine.close()


@pytest.fixture(scope='module')
def client(served):
  from aesalign_jax import serve
  return TestClient(serve.make_app(served[0]), raise_server_exceptions=False)


def test_each_system_returns_the_exact_top_k_of_its_model(served):
  """PT and PT + rephrasing rank the mine stage's index by the PT model, aligned its own index
  by the aligned model, as a brute-force search with the whole models (embed.Embedder) does."""
  from aesalign_jax import embed
  from aesalign_jax.retrieval import index as index_lib
  from aesalign_jax.stages import context
  engine, workdir = served
  for system, model, index in (('pt', 'pretrain', 'mine/index'),
                               ('pt_rephrase', 'pretrain', 'mine/index'),
                               ('aligned', 'align', 'serve/aligned_index')):
    hits = engine.search(QUERY, system, k=8)
    embedder = embed.Embedder(*context.load_model_folder(str(workdir / model / 'model')))
    corpus_emb, ids = index_lib.load_index(str(workdir / index), np.float32)
    scores = corpus_emb @ embedder.texts([hits.searched])[0]
    best = np.argsort(-scores, kind='stable')[:8]
    assert hits.ids == ids.astype(str)[best].tolist(), system
    np.testing.assert_allclose(hits.scores, scores[best], atol=1e-5)
    assert len(hits.aesthetic['iap']) == len(hits.ground_truth) == len(hits.on_topic) == 8
  rephrased = engine.search(QUERY, 'pt_rephrase', 3)
  assert rephrased.searched.startswith(QUERY + ',') and rephrased.rephrase_fallback is None
  assert engine.search(QUERY, 'aligned', 3).searched == QUERY


def test_api_answers_the_python_functions_results_with_image_urls(served, client):
  engine, _ = served
  for system in ('pt', 'pt_rephrase', 'aligned'):
    r = client.get('/api/search', params={'q': QUERY, 'system': system, 'k': 5})
    assert r.status_code == 200, r.text
    body = r.json()
    hits = engine.search(QUERY, system, 5)
    assert body['ids'] == hits.ids and len(body['ids']) == 5
    assert body['scores'] == sorted(body['scores'], reverse=True)
    assert body['rephrased_query'] == (hits.searched if system == 'pt_rephrase' else None)
    assert body['on_topic'] == hits.on_topic and len(body['ground_truth']) == 5
    for url in body['image_urls']:
      image = client.get(url)
      assert image.status_code == 200 and image.headers['content-type'] == 'image/png'
      assert image.content.startswith(b'\x89PNG')
  assert client.get('/healthz').json() == {'status': 'ok', 'images': len(engine)}
  assert 'id="q"' in client.get('/').text
  assert client.get('/api/search', params={'q': QUERY}).json()['k'] == 10   # config.serve.k


@pytest.mark.parametrize('url, status, message', [
    ('/api/search?q=', 400, 'the query is empty'),
    ('/api/search?q=%20%20&system=pt', 400, 'the query is empty'),
    ('/api/search?system=pt', 400, 'missing query: give q=<text>'),
    ('/api/search?q=' + 'a' * 10_000, 400,
     'the query has 10000 characters; at most 1000 are accepted (config.serve.max_query_chars)'),
    ('/api/search?q=red&k=0', 400, 'k=0 must be at least 1'),
    ('/api/search?q=red&k=-3', 400, 'k=-3 must be at least 1'),
    ('/api/search?q=red&k=101', 400, 'k=101 is above the limit 100 (config.serve.max_k)'),
    ('/api/search?q=red&k=ten', 400, "k='ten' is not an integer"),
    ('/api/search?q=red&system=clip', 400,
     "system='clip' is unknown; expected one of pt, pt_rephrase, aligned"),
    ('/api/image/999999', 404, "no image '999999' in the corpus index (2048 images)"),
    ('/api/image/..%2F..%2Fetc%2Fpasswd', 400,
     "image id '../../etc/passwd' is a path that leaves the corpus root"),
    ('/api/image/%2Fetc%2Fpasswd', 400, "image id '/etc/passwd' is a path that leaves"),
    ('/no/such/page', 404, 'Not Found: GET /no/such/page')])
def test_bad_requests_are_answered_4xx_naming_what_is_wrong(client, url, status, message):
  r = client.get(url)
  assert r.status_code == status, r.text
  assert message in r.json()['error']
  assert 'Traceback' not in r.text


def test_an_unexpected_failure_is_answered_500_without_a_trace(served, client, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError('secret internal detail')
  monkeypatch.setattr(served[0], 'search', broken)
  r = client.get('/api/search', params={'q': QUERY})
  assert r.status_code == 500
  assert r.json() == {'error': 'internal error (the server log has the details)'}


def test_file_corpus_images_are_read_from_inside_the_corpus_root_only(tmp_path):
  """Ids name files only through the corpus index (an id that is an absolute path inside the
  root is served; one that is not in the index, refused); a file swapped for a symlink that
  points out of the root after indexing is refused, a deleted one answered 404."""
  from PIL import Image
  from aesalign_jax import search, serve
  from input_pipeline import corpus as corpus_lib, pipeline
  root = tmp_path / 'corpus'
  (root / 'sub').mkdir(parents=True)
  Image.new('RGB', (40, 30), (200, 10, 10)).save(root / 'a.png')
  Image.new('RGB', (40, 30), (10, 10, 200)).save(root / 'sub' / 'b.jpg')
  Image.new('RGB', (40, 30), (10, 200, 10)).save(root / 'c.png')
  Image.new('RGB', (40, 30), (90, 90, 90)).save(root / 'd.png')
  (tmp_path / 'secret.png').write_bytes(b'not for clients')
  (root / 'captions.csv').write_text('image,caption\na.png,red\nsub/b.jpg,blue\nc.png,green\n'
                                     f'{root / "d.png"},grey\n')
  data = pipeline.default_config()
  data.update(source='csv', path=str(root / 'captions.csv'), image_size=32)
  files = corpus_lib.SourceCorpus(data, file_fingerprint=str)
  engine = search.Engine(serve_config=search.default_config(),
                         corpus=corpus_lib.SubsetCorpus(files, np.arange(4)), encoders={},
                         embeddings={}, searcher=None, rephraser=None, scorers={},
                         workdir=str(tmp_path))
  client = TestClient(serve.make_app(engine))
  (root / 'c.png').unlink()
  os.symlink(tmp_path / 'secret.png', root / 'c.png')   # after indexing
  r = client.get('/api/image/a.png')
  assert r.status_code == 200 and r.headers['content-type'] == 'image/png'
  assert r.content == (root / 'a.png').read_bytes()
  r = client.get('/api/image/sub%2Fb.jpg')
  assert r.status_code == 200 and r.headers['content-type'] == 'image/jpeg'
  r = client.get(serve.image_url(str(root / 'd.png')))
  assert r.status_code == 200 and r.content == (root / 'd.png').read_bytes()
  r = client.get('/api/image/c.png')
  assert r.status_code == 403 and r.json()['error'] == (
      "image 'c.png' resolves outside the corpus root")
  assert b'not for clients' not in r.content
  (root / 'sub' / 'b.jpg').unlink()
  r = client.get('/api/image/sub%2Fb.jpg')
  assert r.status_code == 404 and 'cannot be read' in r.json()['error']
  for bad in ('..%2Fsecret.png', 'sub%2F..%2F..%2Fsecret.png', '%2Fetc%2Fpasswd'):
    r = client.get(f'/api/image/{bad}')
    assert r.status_code == 400 and 'leaves the corpus root' in r.json()['error'], bad


def test_a_workdir_without_a_trained_model_is_refused_naming_the_stage(tmp_path):
  """Checked in the order the stages run; then main.py --mode=serve exits 2 with it, no trace."""
  from aesalign_jax import search
  from configs import default
  config = default.get_config('smoke')
  w = tmp_path / 'run'
  with pytest.raises(search.NotReady, match='no workdir'):
    search.check_trained(config, str(w))
  w.mkdir()
  for stage, output in (('pretrain', 'model/'), ('align', 'model/'),
                        ('aesthetic', 'iap.safetensors'), ('mine', 'index/manifest.json')):
    with pytest.raises(search.NotReady, match=f'the `{stage}` stage has not finished'):
      search.check_trained(config, str(w))
    (w / stage / 'model').mkdir(parents=True)
    (w / stage / 'stage.json').write_text('{}')
    if output == 'iap.safetensors':
      (w / stage / output).write_text('')
  (w / 'mine' / 'index').mkdir()
  (w / 'mine' / 'index' / 'manifest.json').write_text('{"format": 1, "complete": true}')
  assert set(search.check_trained(config, str(w))) == {'pretrain', 'align', 'aesthetic'}
  shutil.rmtree(w / 'align')
  out = run_main('--mode=serve', '--config.serve.port=0', workdir=w, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'the `align` stage has not finished' in out.stderr and 'Traceback' not in out.stderr
  assert 'serving http' not in out.stdout


def test_bad_serve_settings_are_refused_before_anything_compiles():
  from aesalign_jax import config_checks
  from configs import default
  for key, value, message in (('port', 70000, 'config.serve.port=70000 must be an integer in'),
                              ('max_k', 0, 'config.serve.max_k=0'),
                              ('k', 500, 'config.serve.k=500 is above config.serve.max_k=100'),
                              ('host', '', "config.serve.host=''"),
                              ('chunk_size', 0, 'config.serve.chunk_size=0 must be')):
    config = default.get_config('smoke')
    config.serve[key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
      config_checks.validate(config, check_inputs=False)


def test_a_config_recorded_before_a_serve_key_existed_gets_its_default():
  """The CLI reads the config a run recorded in eval/report.json, perhaps an older one."""
  import ml_collections
  from aesalign_jax import search
  defaults = search.default_config()
  assert search.serve_section(ml_collections.ConfigDict({'seed': 0})) == defaults
  older = search.serve_section(ml_collections.ConfigDict(
      {'serve': {'host': '127.0.0.1', 'port': 9000, 'max_k': 50, 'retired_key': 1}}))
  assert older.port == 9000 and older.max_k == 50 and older.chunk_size == defaults.chunk_size


def test_typed_world_queries_are_judged_on_topic_like_the_worlds_own():
  from configs import default
  from input_pipeline import corpus as corpus_lib, world as world_lib, world_text
  world = world_lib.World(default.get_config('smoke').world)
  truth = corpus_lib.WorldCorpus(world).truth
  rows = np.arange(500)
  own = next(q for q in world_text.all_queries() if q.text == 'a large red circle')
  np.testing.assert_array_equal(truth.relevant('Big RED circles, sharp', rows),
                                world.is_relevant(own, rows))
  assert world_text.parse_query('two green crosses on a dotted backdrop') == world_text.Query(
      'two green crosses on a dotted backdrop', 'green', 'cross', pattern='dotted')
  for vague in ('a red or blue circle', 'something pretty', 'a red circle and a star'):
    with pytest.raises(KeyError):
      truth.relevant(vague, rows)


def test_cli_prints_each_systems_table_and_writes_a_grid(served, tmp_path):
  """Without --config it reads the run's config from W/eval/report.json."""
  from PIL import Image
  engine, workdir = served
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  png = tmp_path / 'grid.png'
  out = subprocess.run([sys.executable, '-m', 'aesalign_jax.search', f'--workdir={workdir}',
                        '--query', QUERY, '--k', '4', f'--png={png}'],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  tables = out.stdout.split('\n\n')
  for system, table in zip(('pt', 'pt_rephrase', 'aligned'), tables):
    rows = [line.split() for line in table.splitlines() if re.match(r'^\d+\s', line)]
    assert [r[1] for r in rows] == engine.search(QUERY, system, 4).ids, system
  assert 'searched: "a red circle,' in tables[1]
  with Image.open(png) as image:
    assert min(image.size) > 300 and np.asarray(image.convert('L')).std() > 10
  missing = subprocess.run([sys.executable, '-m', 'aesalign_jax.search',
                            f'--workdir={tmp_path / "nothing"}', '--query', QUERY],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert missing.returncode == 2 and 'Traceback' not in missing.stderr
  assert 'eval/report.json does not exist' in missing.stderr


# --- the page in a real browser --------------------------------------------------------------

@pytest.fixture
def browser():
  """(chromium, chromedriver) paths; skips the test, before any server starts, with the
  reason when selenium or either program is missing."""
  pytest.importorskip('selenium', reason='selenium is not installed (pip install -e ".[test]")')
  chromium = next(filter(None, map(shutil.which, ('chromium', 'chromium-browser',
                                                  'google-chrome'))), None)
  driver = shutil.which('chromedriver')
  if chromium is None or driver is None:
    pytest.skip('no headless Chromium: apt-get install chromium chromium-driver (.ci/run '
                'installs them when it can)')
  return chromium, driver


@pytest.fixture
def server_url(served):
  """main.py --mode=serve on the served copy, on a free port (config.serve.port=0): its URL
  once it logs it; stopped (SIGTERM, then SIGKILL) after the test."""
  _, workdir = served
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'),
                           '--config=configs/default.py:smoke', f'--workdir={workdir}',
                           '--mode=serve', '--config.serve.port=0'],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env=env)
  lines, found = [], threading.Event()

  def read():
    for line in proc.stdout:
      lines.append(line)
      if line.startswith('serving http'):
        found.set()
  threading.Thread(target=read, daemon=True).start()
  try:
    deadline = time.time() + 240
    while not found.wait(0.5):
      assert proc.poll() is None and time.time() < deadline, ''.join(lines)[-3000:]
    yield next(l for l in lines if l.startswith('serving http')).split()[1]
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def test_page_in_headless_chromium_shows_three_columns_of_the_apis_k_images(
    browser, server_url, tmp_path):
  import httpx
  from selenium import webdriver
  from selenium.webdriver.chrome.options import Options
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  chromium, chromedriver = browser
  options = Options()
  options.binary_location = chromium
  for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
              '--window-size=1500,1100'):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
  try:
    driver.set_page_load_timeout(60)
    driver.get(server_url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#col-aligned .hits'))
    driver.find_element(By.ID, 'q').send_keys(QUERY)
    k = driver.find_element(By.ID, 'k')
    k.clear()
    k.send_keys('6')
    driver.find_element(By.ID, 'go').click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, 'body').get_attribute('data-state')
               in ('done', 'error'))
    assert driver.find_element(By.TAG_NAME, 'body').get_attribute('data-state') == 'done', (
        driver.find_element(By.ID, 'error').text)
    wait.until(lambda d: d.execute_script(
        "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"))
    api = {}
    for system in ('pt', 'pt_rephrase', 'aligned'):
      shown = [f.get_attribute('data-id')
               for f in driver.find_elements(By.CSS_SELECTOR, f'#col-{system} figure')]
      api[system] = httpx.get(server_url + 'api/search', timeout=30,
                              params={'q': QUERY, 'system': system, 'k': 6}).json()
      assert shown == api[system]['ids'] and len(shown) == 6, system
    searched = driver.find_element(By.CSS_SELECTOR, '#col-pt_rephrase .searched').text
    assert searched == f'searched: “{api["pt_rephrase"]["rephrased_query"]}”'
    assert api['pt_rephrase']['rephrased_query'].startswith(QUERY + ',')
    assert len(driver.find_elements(By.CSS_SELECTOR, 'figure img')) == 18
    shot = tmp_path / 'search_page.png'
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
  finally:
    driver.quit()
