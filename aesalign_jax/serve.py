"""The search page and JSON API over a finished run (main.py --mode=serve): PT, PT +
rephrasing and the aligned model side by side. aesalign_jax/search.py does the searching;
this module is the web layer (FastAPI on uvicorn) and nothing else.

  GET /                          the page (static/search.html; plain HTML and JavaScript)
  GET /api/search?q=&system=&k=  one system's top k as JSON (search.Hits.to_json): ids,
                                 scores, image_urls, rephrased_query, aesthetic scores and,
                                 where the corpus knows them, ground truth and on-topic marks
  GET /api/image/{id}            a corpus image (the world's: rendered now; a file corpus's:
                                 its file, from inside the corpus root only)
  GET /api/info                  index size, systems, k limits (what the page draws)
  GET /healthz                   {"status": "ok"} (answers once the models are loaded)

A refused request is answered 4xx with {"error": "<what is wrong>"}; an unexpected failure is
logged here and answered 500 {"error": ...} without a trace. The URL is logged (and printed)
once the server accepts connections. Requests are not logged one by one (a page's search
fetches dozens of images).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse

import uvicorn
from absl import logging
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from aesalign_jax import search

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static', 'search.html')
LOOPBACK = ('127.0.0.1', 'localhost', '::1')


def image_url(image_id: str) -> str:
  return '/api/image/' + urllib.parse.quote(str(image_id), safe='')


def make_app(engine: search.Engine) -> FastAPI:
  """The web app over an open engine (search.open_run)."""
  app = FastAPI(title='aesalign search', docs_url=None, redoc_url=None, openapi_url=None)
  with open(PAGE, encoding='utf-8') as f:
    page = f.read()

  @app.exception_handler(search.RequestError)
  async def refused(request, exc: search.RequestError):
    del request
    return JSONResponse({'error': str(exc)}, status_code=exc.status)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, exc: StarletteHTTPException):   # unknown path, wrong method
    return JSONResponse({'error': f'{exc.detail}: {request.method} {request.url.path}'},
                        status_code=exc.status_code)

  @app.exception_handler(Exception)
  async def unexpected(request, exc: Exception):
    # The trace goes to the server's log, never to the client.
    logging.error('search server: %s %s failed: %s: %s', request.method, request.url.path,
                  type(exc).__name__, exc, exc_info=exc)
    return JSONResponse({'error': 'internal error (the server log has the details)'},
                        status_code=500)

  @app.get('/', response_class=HTMLResponse)
  def index():
    return page

  @app.get('/healthz')
  def healthz():
    return {'status': 'ok', 'images': len(engine)}

  @app.get('/api/info')
  def info():
    return engine.info()

  # Parameters arrive as strings and are checked by the engine, so every bad value is
  # answered with the engine's message (FastAPI's own 422 would not name the limit).
  @app.get('/api/search')
  def api_search(q: str | None = None, system: str = 'aligned', k: str | None = None):
    return engine.search(q, system, k).to_json(image_url)

  @app.get('/api/image/{image_id:path}')
  def api_image(image_id: str):
    data, media_type = engine.image(image_id)
    return Response(data, media_type=media_type,
                    headers={'Cache-Control': 'public, max-age=3600'})

  return app


def bind(host: str, port: int) -> socket.socket:
  """A socket bound to host:port (port 0: a free one), not yet listening: a busy port fails
  here, before any model is loaded."""
  family, kind, proto, _, address = socket.getaddrinfo(
      host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
  sock = socket.socket(family, kind, proto)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(address)
  except OSError:
    sock.close()
    raise
  return sock


def url_of(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  return f'http://[{host}]:{port}/' if ':' in host else f'http://{host}:{port}/'


class _Server(uvicorn.Server):
  """uvicorn's server, announcing its URL once it accepts connections."""

  def __init__(self, config: uvicorn.Config, url: str):
    super().__init__(config)
    self.url = url

  async def startup(self, sockets=None):
    await super().startup(sockets=sockets)
    if self.started and not self.should_exit:
      logging.info('search page ready: %s', self.url)
      print(f'serving {self.url}', flush=True)


def serve(app: FastAPI, sock: socket.socket) -> None:
  """Serves app on a bound socket until SIGINT or SIGTERM."""
  config = uvicorn.Config(app, log_level='warning', access_log=False, lifespan='off')
  _Server(config, url_of(sock)).run(sockets=[sock])


def main(config, workdir: str, mesh=None) -> None:
  """main.py --mode=serve: refuses (exit 2, naming the stage) a workdir without trained
  models or index, binds config.serve.host:port, loads the run, serves until stopped."""
  import jax   # pylint: disable=g-import-not-at-top
  c = search.serve_section(config)
  if jax.process_count() > 1:
    _exit(f'--mode=serve runs as one process; this is process {jax.process_index()} of '
          f'{jax.process_count()}')
  try:
    sock = bind(c.host, c.port)
  except OSError as e:
    _exit(f'cannot listen on {c.host}:{c.port} ({e.strerror or e}): set --config.serve.port '
          '(0: any free port) or --config.serve.host')
  if c.host not in LOOPBACK:
    logging.warning('search server on %s: it has no authentication; anyone who reaches this '
                    'address can search the corpus and read its images', c.host)
  try:
    engine = search.open_run(config, workdir, mesh)
  except search.NotReady as e:
    sock.close()
    _exit(f'cannot serve {workdir}: {e}')
  try:
    serve(make_app(engine), sock)
  finally:
    engine.close()


def _exit(message: str) -> None:
  logging.error('%s', message)
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)
