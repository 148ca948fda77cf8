"""The system-level judge (PAPER.md): the order-consistency rule on a scripted judge, the world
and scorer judges on known truths, and the openai judge against a loopback OpenAI-compatible
server started by the test (parsing, refusals, malformed answers, retries, images sent as PNG
data URLs, the API key kept out of logs and results)."""

import base64
import collections
import http.server
import io
import json
import logging
import re
import threading
import time
import types

import numpy as np
import pytest
from PIL import Image

from aesalign_jax.evaluation import judge as judge_lib
from aesalign_jax.evaluation.judge import Group, judge_systems
from aesalign_jax.evaluation.judge_openai import OpenAIJudge, parse_verdict
from loopback import chat_answer, send_json, serving

A, B, S = "A", "B", "similar"


# --- the protocol on a scripted judge ---------------------------------------------------------

def test_outcome_table_follows_the_order_consistency_rule():
  # (call 1 with A = system 1, call 2 with A = system 2) -> outcome for system 1.
  table = {(A, B): "win", (B, A): "lose",
           (A, A): "similar", (B, B): "similar",          # position bias: the calls disagree
           (S, B): "similar", (A, S): "similar", (S, A): "similar", (B, S): "similar",
           (S, S): "similar"}
  assert {calls: judge_lib.outcome(*calls) for calls in table} == table


class ScriptedJudge:
  """Answers from a script: {query: (answer when system 1 is A, answer when system 2 is A)}.
  An answer is a verdict dict, None (a failed call) or 'raise'."""

  name = "scripted"
  aspects = judge_lib.ASPECTS

  def __init__(self, script):
    self.script = script

  def compare(self, query, group_a, group_b):
    assert {int(group_a.rows[0]), int(group_b.rows[0])} == {1, 2}
    answer = self.script[query][0 if group_a.rows[0] == 1 else 1]
    if answer == "raise":
      raise RuntimeError("judge crashed")
    return answer


def _v(accuracy, aesthetic):
  return {"accuracy": accuracy, "aesthetic": aesthetic}


SCRIPT = {
    "both prefer 1": (_v(A, A), _v(B, B)),
    "both prefer 2": (_v(B, B), _v(A, A)),
    "always first": (_v(A, A), _v(A, A)),
    "always second": (_v(B, B), _v(B, B)),
    "one similar": (_v(S, A), _v(B, S)),
    "both similar": (_v(S, S), _v(S, S)),
    "accuracy 1 aesthetic 2": (_v(A, B), _v(B, A)),
    "second call failed": (_v(A, A), None),
    "first call raised": ("raise", _v(B, B)),
    "unknown choice": (_v("C", A), _v(B, B)),
    "missing aspect": ({"accuracy": A}, _v(B, B)),
}


@pytest.mark.parametrize("max_concurrency", [1, 4])
def test_scripted_judge_gives_win_similar_lose_and_excludes_failed_calls(max_concurrency):
  queries = list(SCRIPT)
  tops_1, tops_2 = [[1, 10, 11]] * len(queries), [[2, 20, 21]] * len(queries)
  result = judge_systems(ScriptedJudge(SCRIPT), queries, tops_1, tops_2,
                         max_concurrency=max_concurrency)

  outcomes = {p["query"]: p["outcome"] for p in result["per_query"]}
  assert [p["query"] for p in result["per_query"]] == queries   # input order kept
  assert outcomes["both prefer 1"] == {"accuracy": "win", "aesthetic": "win"}
  assert outcomes["both prefer 2"] == {"accuracy": "lose", "aesthetic": "lose"}
  for q in ("always first", "always second", "one similar", "both similar"):
    assert outcomes[q] == {"accuracy": "similar", "aesthetic": "similar"}, q
  assert outcomes["accuracy 1 aesthetic 2"] == {"accuracy": "win", "aesthetic": "lose"}
  for q in ("second call failed", "first call raised", "unknown choice", "missing aspect"):
    assert outcomes[q] is None, q

  assert (result["num_queries"], result["num_judged"], result["failures"],
          result["failed_calls"]) == (11, 7, 4, 4)
  acc, aes = result["rates"]["accuracy"], result["rates"]["aesthetic"]
  assert acc["counts"] == {"win": 2, "similar": 4, "lose": 1}
  assert aes["counts"] == {"win": 1, "similar": 4, "lose": 2}
  assert (acc["win"], acc["similar"], acc["lose"]) == pytest.approx((2 / 7, 4 / 7, 1 / 7))
  assert acc["win_plus_similar"] == pytest.approx(6 / 7)
  assert aes["win_plus_similar"] == pytest.approx(5 / 7)

  reasons = {p["query"]: p["reasons"] for p in result["per_query"]}
  assert reasons["both prefer 1"] == ["", ""]
  assert reasons["second call failed"][0] == "" and reasons["second call failed"][1]
  assert "judge crashed" in reasons["first call raised"][0]
  assert "malformed" in reasons["unknown choice"][0]
  assert "malformed" in reasons["missing aspect"][0]
  json.dumps(result)  # JSON-ready


def test_all_calls_failing_leaves_rates_undefined_and_does_not_raise():
  script = {"q1": (None, None), "q2": ("raise", "raise")}
  result = judge_systems(ScriptedJudge(script), list(script), [[1]] * 2, [[2]] * 2)
  assert (result["num_judged"], result["failures"], result["failed_calls"]) == (0, 2, 4)
  assert result["rates"]["aesthetic"]["win"] is None
  assert result["rates"]["aesthetic"]["counts"] == {"win": 0, "similar": 0, "lose": 0}


def test_one_aspect_can_be_judged_alone_and_bad_arguments_raise():
  script = {"q": (_v(A, B), _v(B, A))}
  result = judge_systems(ScriptedJudge(script), ["q"], [[1]], [[2]], aspects=("aesthetic",))
  assert list(result["rates"]) == ["aesthetic"]
  assert result["per_query"][0]["outcome"] == {"aesthetic": "lose"}
  with pytest.raises(ValueError, match="queries"):
    judge_systems(ScriptedJudge(script), ["q"], [[1]], [[2], [2]])
  with pytest.raises(ValueError, match="aspects"):
    judge_systems(ScriptedJudge(script), ["q"], [[1]], [[2]], aspects=("beauty",))
  aesthetic_only = judge_lib.ScorerJudge(lambda g: 0.0, None)
  with pytest.raises(ValueError, match="does not judge"):
    judge_systems(aesthetic_only, ["q"], [[1]], [[2]])


def test_group_checks_its_fields():
  assert len(Group(rows=[3, 4])) == 2
  assert len(Group(paths=["a.png"])) == 1
  with pytest.raises(ValueError, match="disagree"):
    Group(rows=[1, 2], images=np.zeros((3, 4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    Group(rows=[1], images=np.zeros((1, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="empty"):
    Group()


# --- world and scorer judges ----------------------------------------------------------------

class ToyWorld:
  """World-like truth: images 0..9; relevance per query text; a fixed aesthetic per image."""

  queries = [types.SimpleNamespace(text="a red cat"), types.SimpleNamespace(text="a blue dog")]
  relevant = {"a red cat": {0, 1, 2, 3, 8}, "a blue dog": {4, 5, 6, 7}}
  aesthetics = np.array([0.3, 0.3, 0.3, 0.3, 0.8, 0.8, 0.5, 0.51, 0.9, 0.9])

  def is_relevant(self, query, ids):
    return np.isin(ids, sorted(self.relevant[query.text]))

  def aesthetic(self, ids):
    return self.aesthetics[np.asarray(ids)]


def test_world_judge_gives_the_ground_truth_outcome():
  world = ToyWorld()
  judge = judge_lib.make_judge(judge_lib.default_config(), world=world)
  queries = ["a red cat", "a blue dog", world.queries[0], "a green cow"]
  tops_1 = [[0, 1, 2, 3],   # all relevant, plain (0.3)
            [6, 7],         # all relevant, 0.505
            [0, 8],         # a Query object, not text: all relevant, 0.6
            [0, 1]]
  tops_2 = [[8, 9, 4, 5],   # 1 of 4 relevant, beautiful (0.85)
            [4, 6],         # all relevant, 0.65
            [1, 2],         # all relevant, 0.3
            [2, 3]]
  result = judge_systems(judge, queries, tops_1, tops_2)
  outcomes = [p["outcome"] for p in result["per_query"]]
  assert outcomes[0] == {"accuracy": "win", "aesthetic": "lose"}
  assert outcomes[1] == {"accuracy": "similar", "aesthetic": "lose"}
  assert outcomes[2] == {"accuracy": "similar", "aesthetic": "win"}
  # Not a query of this world: a failed call, counted and named, not a crash.
  assert outcomes[3] is None and "a green cow" in result["per_query"][3]["reasons"][0]
  assert (result["num_judged"], result["failures"]) == (3, 1)
  assert result["rates"]["aesthetic"]["counts"] == {"win": 1, "similar": 0, "lose": 2}


def test_world_judge_margins_and_row_ids():
  world = ToyWorld()
  truth = judge_lib.WorldJudge(world).truth("a blue dog", Group(rows=[6, 7]))
  assert truth == pytest.approx({"accuracy": 1.0, "aesthetic": 0.505})
  # Aesthetic 0.5 vs 0.51 is within the default margin, outside a margin of 0.005.
  assert judge_lib.WorldJudge(world).compare(
      "a blue dog", Group(rows=[6]), Group(rows=[7]))["aesthetic"] == S
  assert judge_lib.WorldJudge(world, aesthetic_margin=0.005).compare(
      "a blue dog", Group(rows=[6]), Group(rows=[7]))["aesthetic"] == B
  # One relevant image of two against none: a 0.5 accuracy gap, similar under margin 0.5.
  assert judge_lib.WorldJudge(world, accuracy_margin=0.5).compare(
      "a red cat", Group(rows=[0, 5]), Group(rows=[5, 6]))["accuracy"] == S
  assert judge_lib.WorldJudge(world, accuracy_margin=0.49).compare(
      "a red cat", Group(rows=[0, 5]), Group(rows=[5, 6]))["accuracy"] == A
  # Rows are positions in a corpus whose world ids are row_ids.
  mapped = judge_lib.WorldJudge(world, row_ids=[9, 8, 1, 0])
  assert mapped.truth("a red cat", Group(rows=[0])) == pytest.approx(
      {"accuracy": 0.0, "aesthetic": 0.9})
  with pytest.raises(ValueError, match="accuracy_margin"):
    judge_lib.WorldJudge(world, accuracy_margin=-1)


def test_world_judge_on_the_embedded_world_prefers_relevant_beautiful_images():
  from input_pipeline import world as world_lib
  world = world_lib.World(num_train=0, num_eval=3000, num_hpir_pool=0)
  ids = world.split_indices("eval")
  query = next(q for q in world.eval_queries if q.kind == "colour_shape")
  relevant = ids[world.is_relevant(query, ids)]
  irrelevant = ids[~world.is_relevant(query, ids)][:5]
  assert len(relevant) >= 10
  by_aesthetic = relevant[np.argsort(world.aesthetic(relevant))]
  best, worst = by_aesthetic[-5:], by_aesthetic[:5]
  result = judge_systems(judge_lib.WorldJudge(world), [query.text, query], [best, best],
                         [worst, irrelevant])
  assert result["per_query"][0]["outcome"] == {"accuracy": "similar", "aesthetic": "win"}
  assert result["per_query"][1]["outcome"]["accuracy"] == "win"


class Brightness:
  name = "brightness"

  def score(self, images):
    return images.reshape(len(images), -1).mean(1) / 255.0


def test_scorer_judge_uses_the_aesthetic_and_semantic_functions():
  bright = Group(rows=[1, 2], images=np.full((2, 4, 4, 3), 200, np.uint8))
  dark = Group(rows=[3, 4], images=np.full((2, 4, 4, 3), 20, np.uint8))
  # Semantic score: per image, 1 when the row is odd (say, relevant to query 'odd').
  semantic = lambda query, group: (group.rows % 2 == 1).astype(float)
  config = judge_lib.default_config()
  config.kind = "scorer"
  judge = judge_lib.make_judge(config, aesthetic_fn=judge_lib.scorer_aesthetic_fn(Brightness()),
                               semantic_fn=semantic)
  assert judge.compare("odd", bright, dark) == {"accuracy": S, "aesthetic": A}
  result = judge_systems(judge, ["odd"], [dark], [bright])
  assert result["per_query"][0]["outcome"] == {"accuracy": "similar", "aesthetic": "lose"}
  # A scorer that needs pixels fails the call, by name, when the groups have none.
  result = judge_systems(judge, ["odd"], [[1, 2]], [[3, 4]])
  assert result["failures"] == 1 and "brightness" in result["per_query"][0]["reasons"][0]


def test_parse_verdict_takes_json_from_fences_and_preambles_and_rejects_the_rest():
  want = {"accuracy": "A", "aesthetic": "similar"}
  assert parse_verdict('{"accuracy": "A", "aesthetic": "similar"}') == (want, "")
  fenced = ('Looking at both groups, A matches better.\n```json\n'
            '{"Accuracy": "Group A", "aesthetics": "tie"}\n```\nHope this helps {:}')
  assert parse_verdict(fenced) == (want, "")
  assert parse_verdict('{"note": 1} then {"accuracy": "b", "aesthetic": "a."}')[0] == {
      "accuracy": "B", "aesthetic": "A"}
  for text, why in ((None, "empty"), ("", "empty"), ("I'm sorry, I can't help.", "no JSON"),
                    ('{"accuracy": "A"}', "without"),
                    ('{"accuracy": "maybe", "aesthetic": "A"}', "unrecognised"),
                    ('{"accuracy": 1, "aesthetic": "A"}', "unrecognised"),
                    ('{"accuracy": "A", "aesthetic": "B"', "no JSON")):
    verdict, reason = parse_verdict(text)
    assert verdict is None and why in reason, text


# --- the openai judge against a loopback server -----------------------------------------------

KEY_ENV = "AESALIGN_TEST_JUDGE_KEY"
KEY = "sk-judge-test-4b3a2c1d-secret"
BRIGHT, DARK = 200, 30


class FakeLMM(http.server.ThreadingHTTPServer):
  """Answers by the query's first word: 'ok' prefers the bright group ('ok dark': the dark
  one) on both aspects; 'fence' the same inside a ```json fence after a preamble; 'rate' gets
  a 429 first; 'bias' always answers A; 'refuse' refuses in words; 'filter' is stopped by a
  content filter; 'garbled' gets a truncated response; 'badchoice' an unknown choice; 'echo' a
  401 whose body repeats the Authorization header; 'down' is always 500; 'slow' answers after
  0.05 s."""

  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.calls = collections.Counter()
    self.auth = set()
    self.bodies = []
    self.in_flight = self.max_in_flight = 0
    self.lock = threading.Lock()

  @property
  def base_url(self):
    return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _decode_png(url):
  assert url.startswith("data:image/png;base64,")
  raw = base64.b64decode(url.split(",", 1)[1])
  assert raw.startswith(b"\x89PNG")
  return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def _group_images(content):
  """{'A': [images], 'B': [images]} from a request's user content parts."""
  groups, current = {"A": [], "B": []}, None
  for part in content:
    if part["type"] == "text":
      m = re.match(r"Group ([AB])", part["text"])
      current = m.group(1) if m else current
    elif part["type"] == "image_url":
      groups[current].append(_decode_png(part["image_url"]["url"]))
  return groups


class _Handler(http.server.BaseHTTPRequestHandler):

  def log_message(self, *args):
    pass

  def do_POST(self):
    server = self.server
    with server.lock:
      server.in_flight += 1
      server.max_in_flight = max(server.max_in_flight, server.in_flight)
    try:
      self._answer(server)
    except (BrokenPipeError, ConnectionResetError):
      pass
    finally:
      with server.lock:
        server.in_flight -= 1

  def _answer(self, server):
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    assert self.path == "/v1/chat/completions"
    content = body["messages"][-1]["content"]
    query = re.search(r'query: "(.*)"', content[0]["text"]).group(1)
    with server.lock:
      server.calls[query] += 1
      count = server.calls[query]
      server.auth.add(self.headers.get("Authorization"))
      server.bodies.append(body)
    kind = query.split()[0]
    if kind == "slow":
      time.sleep(0.05)
    if kind == "down" or (kind == "rate" and count == 1):
      return self._send(500 if kind == "down" else 429, b'{"error": "try later"}',
                        {"Retry-After": "0"})
    if kind == "echo":
      return self._send(401, json.dumps(
          {"error": f"bad key {self.headers['Authorization']}"}).encode())
    if kind == "garbled":
      return self._send(200, b'{"choices": [{"message": {"content": "{\\"accur')
    finish, text = "stop", None
    if kind in ("ok", "fence", "rate", "slow"):
      images = _group_images(content)
      a_is_bright = images["A"][0].mean() > images["B"][0].mean()
      want_bright = not query.endswith("dark")
      choice = "A" if a_is_bright == want_bright else "B"
      text = json.dumps({"accuracy": choice, "aesthetic": choice})
      if kind == "fence":
        text = f"Let me compare the two groups.\n\n```json\n{text}\n```\nGroup {choice} wins."
    elif kind == "bias":
      text = '{"accuracy": "A", "aesthetic": "A"}'
    elif kind == "refuse":
      text = "I'm sorry, but I can't help with comparing these images."
    elif kind == "badchoice":
      text = '{"accuracy": "maybe", "aesthetic": "A"}'
    elif kind == "filter":
      finish = "content_filter"
    self._send(200, chat_answer(text, finish))

  def _send(self, status, payload, headers=()):
    send_json(self, status, payload, headers)


@pytest.fixture
def server(monkeypatch):
  with serving(FakeLMM(), monkeypatch, KEY_ENV, KEY) as srv:
    yield srv


def _config(server, **overrides):
  c = judge_lib.default_config()
  c.update(dict(kind="openai", base_url=server.base_url, model="tiny-vision",
                api_key_env=KEY_ENV, timeout_s=2.0, max_retries=2, backoff_s=0.01,
                max_backoff_s=0.1, max_concurrency=4, max_images_per_group=3))
  c.update(overrides)
  return c


def _groups(n, k=4, side=16):
  """System 1 returns bright images, system 2 dark ones."""
  bright = Group(rows=np.arange(k), images=np.full((k, side, side, 3), BRIGHT, np.uint8))
  dark = Group(rows=np.arange(k) + k, images=np.full((k, side, side, 3), DARK, np.uint8))
  return [bright] * n, [dark] * n


def test_openai_judge_parses_answers_retries_and_counts_failures(server, caplog, capsys):
  caplog.set_level(logging.DEBUG)
  queries = ["ok bright", "ok dark", "fence bright", "rate bright", "bias x", "refuse x",
             "filter x", "garbled x", "badchoice x", "echo x", "down x"]
  judge = judge_lib.make_judge(_config(server))
  result = judge_systems(judge, queries, *_groups(len(queries)))
  by_query = {p["query"]: p for p in result["per_query"]}

  win = {"accuracy": "win", "aesthetic": "win"}
  assert by_query["ok bright"]["outcome"] == win
  assert by_query["ok dark"]["outcome"] == {"accuracy": "lose", "aesthetic": "lose"}
  assert by_query["fence bright"]["outcome"] == win            # fenced JSON after a preamble
  assert by_query["rate bright"]["outcome"] == win             # 429, then retried
  assert server.calls["rate bright"] == 3
  assert by_query["bias x"]["outcome"] == {"accuracy": "similar", "aesthetic": "similar"}
  for q in queries[5:]:
    assert by_query[q]["outcome"] is None, q
  assert (result["num_judged"], result["failures"], result["failed_calls"]) == (5, 6, 12)
  assert result["rates"]["aesthetic"]["counts"] == {"win": 3, "similar": 1, "lose": 1}
  assert result["rates"]["accuracy"]["win_plus_similar"] == pytest.approx(0.8)

  reasons = {q: by_query[q]["reasons"][0] for q in queries[5:]}
  assert "no JSON verdict" in reasons["refuse x"]
  assert "refused" in reasons["filter x"]
  assert "malformed response" in reasons["garbled x"]
  assert "unrecognised choice" in reasons["badchoice x"]
  assert "HTTP 401" in reasons["echo x"] and "***" in reasons["echo x"]
  assert "HTTP 500" in reasons["down x"] and "gave up after 3 tries" in reasons["down x"]
  # Malformed answers and refusals are not retried; 5xx are, up to max_retries.
  assert [server.calls[q] for q in ("refuse x", "garbled x", "badchoice x")] == [2, 2, 2]
  assert server.calls["down x"] == 6

  assert server.auth == {f"Bearer {KEY}"}   # the key was sent ...
  captured = capsys.readouterr()
  for text in (caplog.text, captured.out, captured.err, json.dumps(result), repr(judge)):
    assert KEY not in text                  # ... and is nowhere else
  assert "retry" in caplog.text and "excluded" in caplog.text


def test_openai_request_carries_the_query_and_both_groups_as_png_data_urls(server):
  judge = judge_lib.make_judge(_config(server, max_images_per_group=3, image_detail="low"))
  tops_1, tops_2 = _groups(1, k=4, side=16)
  result = judge_systems(judge, ["ok bright"], tops_1, tops_2, max_concurrency=1)  # in order
  assert result["num_judged"] == 1 and len(server.bodies) == 2
  body = server.bodies[0]
  assert body["model"] == "tiny-vision" and body["temperature"] == 0.0
  system, user = body["messages"]
  assert system["role"] == "system" and '"aesthetic"' in system["content"]
  parts = user["content"]
  assert [p["type"] for p in parts] == ["text", "text"] + ["image_url"] * 3 + [
      "text"] + ["image_url"] * 3 + ["text"]
  assert parts[0]["text"] == 'Search query: "ok bright"'
  assert all(p["image_url"]["detail"] == "low" for p in parts if p["type"] == "image_url")
  images = _group_images(parts)
  assert [len(images["A"]), len(images["B"])] == [3, 3]    # capped at max_images_per_group
  # The pixels arrive unchanged; call 1 shows system 1 (bright) as A, call 2 swaps.
  np.testing.assert_array_equal(images["A"][0], tops_1[0].images[0])
  np.testing.assert_array_equal(images["B"][0], tops_2[0].images[0])
  swapped = _group_images(server.bodies[1]["messages"][1]["content"])
  assert swapped["A"][0].mean() == DARK and swapped["B"][0].mean() == BRIGHT


def test_openai_images_can_be_resized_tiled_or_read_from_paths(server, tmp_path):
  judge = judge_lib.make_judge(_config(server, image_side=64, as_grid=True))
  tops_1, tops_2 = _groups(1, k=4, side=16)
  judge_systems(judge, ["ok bright"], tops_1, tops_2, max_concurrency=1)
  images = _group_images(server.bodies[0]["messages"][1]["content"])
  # 3 images of 64 px in a 2 x 2 grid with 2-pixel gaps; the empty cell is white.
  assert [len(images["A"]), len(images["B"])] == [1, 1]
  assert images["A"][0].shape == (130, 130, 3)
  assert images["A"][0][:64, :64].min() == BRIGHT and images["A"][0][-64:, -64:].min() == 255
  paths = []
  for i, level in enumerate((BRIGHT, DARK)):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(paths[-1])
  judge = judge_lib.make_judge(_config(server))
  result = judge_systems(judge, ["ok bright", "ok missing"], [Group(paths=paths[:1])] * 2,
                         [Group(paths=paths[1:]), Group(paths=[str(tmp_path / "no.png")])])
  assert result["per_query"][0]["outcome"] == {"accuracy": "win", "aesthetic": "win"}
  assert result["per_query"][1]["outcome"] is None   # an unreadable image fails the call
  assert "no.png" in result["per_query"][1]["reasons"][0]


def test_openai_judge_keeps_at_most_max_concurrency_calls_in_flight(server):
  judge = judge_lib.make_judge(_config(server, max_concurrency=3))
  queries = [f"slow bright {i}" for i in range(8)]
  result = judge_systems(judge, queries, *_groups(len(queries)))
  assert result["num_judged"] == 8 and result["rates"]["accuracy"]["win"] == 1.0
  assert server.max_in_flight == 3


def test_openai_config_errors_name_the_key_and_unreachable_endpoints_fail_softly(
    server, monkeypatch):
  with pytest.raises(ValueError, match="evals.judge.model"):
    judge_lib.make_judge(_config(server, model=""))
  with pytest.raises(ValueError, match="evals.judge.max_images_per_group"):
    judge_lib.make_judge(_config(server, max_images_per_group=0))
  with pytest.raises(ValueError, match="evals.judge.kind"):
    judge_lib.make_judge(_config(server, kind="oracle"))
  monkeypatch.delenv(KEY_ENV)
  with pytest.raises(ValueError, match=f"evals.judge.api_key_env.*{KEY_ENV}"):
    judge_lib.make_judge(_config(server))
  # No key configured: no Authorization header at all.
  judge = judge_lib.make_judge(_config(server, api_key_env=""))
  assert judge_systems(judge, ["ok bright"], *_groups(1))["num_judged"] == 1
  assert server.auth == {None}
  unreachable = judge_lib.make_judge(_config(server, api_key_env="",
                                             base_url="http://127.0.0.1:9/v1", max_retries=0))
  result = judge_systems(unreachable, ["ok bright"], *_groups(1))
  assert result["failures"] == 1
  assert "connection failed" in result["per_query"][0]["reasons"][0]
  assert isinstance(unreachable, OpenAIJudge)


# --- mutation survivors (benchmarks/mutation.py): each test kills mutants the rest let live ---

def test_a_similar_choice_prefers_no_system_in_either_call():
  assert [judge_lib.preferred_system(S, call) for call in (1, 2)] == [0, 0]
  assert [judge_lib.preferred_system(A, call) for call in (1, 2)] == [1, 2]


def test_no_queries_give_an_empty_result_and_zero_concurrency_is_refused():
  result = judge_systems(ScriptedJudge({}), [], [], [])
  assert (result["num_queries"], result["num_judged"], result["failed_calls"]) == (0, 0, 0)
  assert result["rates"]["accuracy"]["win"] is None
  with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
    judge_systems(ScriptedJudge(SCRIPT), ["both prefer 1"], [[1]], [[2]], max_concurrency=0)


def test_a_verdict_that_is_not_a_dict_is_a_failed_call():
  script = {"q": ("A", _v(B, B))}
  result = judge_systems(ScriptedJudge(script), ["q"], [[1]], [[2]])
  assert result["per_query"][0]["outcome"] is None and result["failed_calls"] == 1
  assert "malformed verdict: a str, not a dict" in result["per_query"][0]["reasons"][0]


def test_judge_margins_default_to_the_config_defaults():
  config = judge_lib.default_config()
  expected = {"accuracy": config.accuracy_margin, "aesthetic": config.aesthetic_margin}
  assert judge_lib.WorldJudge(ToyWorld()).margins == expected
  assert judge_lib.ScorerJudge(lambda g: 0.0, None).margins == expected


def test_scorer_judge_with_only_a_semantic_function_judges_accuracy_alone():
  judge = judge_lib.ScorerJudge(None, lambda query, group: group.rows % 2)
  assert judge.aspects == ("accuracy",)
  assert judge.compare("odd", Group(rows=[1, 3]), Group(rows=[2, 4])) == {"accuracy": A}


class TextOnlyWorld(ToyWorld):
  """A world without a query list: the judge passes query texts through as they are."""

  queries = ()

  def is_relevant(self, query, ids):
    assert isinstance(query, str)
    return np.isin(ids, sorted(self.relevant[query]))


def test_world_judge_passes_text_through_when_the_world_lists_no_queries():
  judge = judge_lib.WorldJudge(TextOnlyWorld())
  assert judge.compare("a red cat", Group(rows=[0, 1]), Group(rows=[4, 5])) == {
      "accuracy": A, "aesthetic": B}
