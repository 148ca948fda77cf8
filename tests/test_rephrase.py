"""Rephrasers: prompt styles, the answer parser, the lexicon and hf backends, the cache and the
fallback policy. The openai backend against a loopback server is in test_rephrase_openai.py."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from aesalign_jax import rephrase
from aesalign_jax.rephrase import Attempt, RephraseCache, Rephraser, lexicon, prompts
from aesalign_jax.rephrase import rephrase_query
from input_pipeline import world_text

AESTHETIC_STYLES = ("detail", "k_list", "kw_dict", "repeat", "reorg")
QUERIES = ["a red circle", "a small blue star", "a green square on a striped background",
           "a yellow triangle on a dotted background", "a large purple star"]
# Keywords each lexicon style adds with k = 3 (see lexicon.rephrase_query).
ADDED = {"detail": 6, "k_list": 3, "kw_dict": 3, "repeat": 2, "reorg": 5}


def _world_phrases(text):
  return world_text.find_aesthetic_phrases(text)


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("style", AESTHETIC_STYLES)
def test_every_prompt_asks_for_one_line_with_the_query_and_aesthetic_aspects(style):
  text = prompts.user_prompt(style, "a  red\ncat", k=4)
  assert "Query: a red cat" in text
  assert "one line" in text.lower()
  for aspect in ("composition", "lighting", "colour"):
    assert aspect in text
  assert prompts.chat_messages(style, "a red cat")[0]["content"] == prompts.SYSTEM_PROMPT
  assert prompts.plain_prompt(style, "a red cat").endswith("Search query:")


def test_k_list_prompt_states_k_and_fingerprints_differ_by_style_and_k():
  assert "5 keywords" in prompts.user_prompt("k_list", "a cat", k=5)
  ids = {prompts.prompt_fingerprint(s, k) for s in AESTHETIC_STYLES for k in (3, 5)}
  # kw_dict, detail, repeat, reorg ignore k in their text but k is still part of the id.
  assert len(ids) == 10


def test_original_style_has_no_prompt_and_unknown_style_is_refused_naming_the_key():
  with pytest.raises(ValueError, match="original"):
    prompts.user_prompt("original", "a cat")
  with pytest.raises(ValueError, match="rephrase.style"):
    prompts.user_prompt("poem", "a cat")


# ----------------------------------------------------------------------------- parser

PARSER_CASES = [
    ("a red cat at dusk, soft light", "a red cat at dusk, soft light"),
    ("Sure! Here is the rephrased query: a red cat, soft light",
     "a red cat, soft light"),
    ('Sure, here\'s a rephrased version of your query:\n\n"A red cat, golden hour light"\n\n'
     "This version emphasises lighting.", "A red cat, golden hour light"),
    ("Certainly. Here you go:\n\n\n  “a misty forest, pastel colours”  \n",
     "a misty forest, pastel colours"),
    ("1. a red cat, sharp focus\n2. a red cat, warm light\n3. a cat", "a red cat, sharp focus"),
    ("- a red cat, well lit\n- another option", "a red cat, well lit"),
    ("**Rephrased query:** *a red cat, well composed*", "a red cat, well composed"),
    ("### Search query\n`a red cat, clean background`", "a red cat, clean background"),
    ('"a red cat in soft light" - this adds lighting cues.', "a red cat in soft light"),
    ("a red cat, well composed. This query emphasises composition.",
     "a red cat, well composed"),
    ("a red cat (this adds a calm mood)", "a red cat"),
    ("<think>the user wants light</think>\na red cat, soft light", "a red cat, soft light"),
    ("```\na red cat, pastel colours\n```", "a red cat, pastel colours"),
    ("Here is a rephrased query that stresses mood:\n\n1) 'a calm red cat, muted tones'",
     "a calm red cat, muted tones"),
    ("Great Wall of China at sunset, golden light", "Great Wall of China at sunset, golden light"),
    ("'Starry Night' style painting of a cat", "'Starry Night' style painting of a cat"),
    ("a red cat.", "a red cat"),
    ("a red\x1b cat\ufffd, soft\u200b light", "a red cat, soft light"),
]


@pytest.mark.parametrize("answer,expected", PARSER_CASES)
def test_parser_extracts_one_clean_query_line(answer, expected):
  assert prompts.parse_answer(answer) == expected


@pytest.mark.parametrize("answer", [
    None, "", "   \n\n  \t", '""', "**  **", "Sure! Here is the rephrased query:",
    "I'm sorry, but I can't help with that request.", "As an AI, I cannot browse images.",
    "Sure!\n\nI cannot rephrase this query."])
def test_parser_returns_none_for_empty_answers_and_refusals(answer):
  assert prompts.parse_answer(answer) is None


def test_parser_joins_list_answers_for_list_styles_only():
  keywords = "Keywords:\n1. soft light\n2. pastel colours\n3. well composed"
  assert prompts.parse_answer(keywords, "k_list") == "soft light, pastel colours, well composed"
  assert prompts.parse_answer(keywords, "detail") == "soft light"
  pairs = "subject: a cat\nlighting: soft\ncolour: warm tones\n\nThese pairs describe..."
  assert (prompts.parse_answer(pairs, "kw_dict")
          == "subject: a cat, lighting: soft, colour: warm tones")
  as_json = 'Here you go:\n```json\n{"subject": "a cat", "mood": ["calm", "serene"]}\n```'
  assert prompts.parse_answer(as_json, "kw_dict") == "subject: a cat, mood: calm, serene"


def test_parser_bounds_the_answer_to_max_words():
  answer = " ".join(f"word{i}" for i in range(100))
  assert prompts.parse_answer(answer, max_words=7).split() == [f"word{i}" for i in range(7)]


# ----------------------------------------------------------------------------- lexicon


def test_lexicon_dictionary_holds_every_positive_world_word_and_no_negative_one():
  positive = {w for w, _, sign in world_text.aesthetic_phrase_table() if sign == "positive"}
  for vocabulary in lexicon.VOCABULARIES:
    words = lexicon.keyword_dictionary(vocabulary)
    assert set(words) == set(lexicon.ASPECTS)
    flat = [w for ws in words.values() for w in ws]
    assert positive <= set(flat), vocabulary
    negative = [(w, row) for w in flat for row in world_text.find_aesthetic_phrases(w)
                if row[2] != "positive"]
    assert not negative, negative
  assert {w for ws in lexicon.CORE_KEYWORDS.values() for w in ws} == positive


@pytest.mark.parametrize("style", AESTHETIC_STYLES)
def test_lexicon_styles_keep_the_query_and_add_world_aesthetic_words(style):
  for query in QUERIES:
    text = rephrase_query(query, style)
    assert text.startswith(query + ", ")
    found = _world_phrases(text)
    assert len(found) == ADDED[style], (text, found)
    assert len({w for w, _, _ in found}) == len(found), text  # no keyword twice
    assert all(sign == "positive" for _, _, sign in found), text
  if style == "repeat":
    assert rephrase_query("a red cat", style).startswith("a red cat, a red cat, ")


def test_lexicon_original_returns_the_query_unchanged():
  for query in QUERIES:
    assert rephrase_query(query, "original") == query
  r = rephrase.make_rephraser(_config(style="original")).rephrase_batch(QUERIES)
  assert r.texts == QUERIES and r.status == ["ok"] * len(QUERIES) and r.backend_calls == 0


def test_lexicon_k_list_and_kw_dict_add_k_keywords_from_distinct_aspects():
  words = lexicon.keyword_dictionary("core")
  aspect_of = {w: a for a, ws in words.items() for w in ws}
  text = rephrase_query("a red cat", "k_list", k=6)
  added = text.split(", ")[1:]
  assert len(added) == 6 and len({aspect_of[w] for w in added}) == 6
  pairs = rephrase_query("a red cat", "kw_dict", k=4).split(", ")[1:]
  assert len(pairs) == 4
  for pair in pairs:
    aspect, word = pair.split(": ")
    assert aspect_of[word] == aspect


def test_lexicon_is_deterministic_across_processes_and_hash_seeds():
  here = {s: [rephrase_query(q, s, k=3, seed=5) for q in QUERIES] for s in rephrase.STYLES}
  assert here == {s: [rephrase_query(q, s, k=3, seed=5) for q in QUERIES]
                  for s in rephrase.STYLES}
  code = textwrap.dedent(f"""
      import json
      from aesalign_jax.rephrase import STYLES, rephrase_query
      print(json.dumps({{s: [rephrase_query(q, s, k=3, seed=5) for q in {QUERIES!r}]
                         for s in STYLES}}))""")
  for hash_seed in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert json.loads(out.stdout) == here


# Pinned outputs: the keyword choice must never drift (mined data sets depend on it).
GOLDEN = {
    "detail": "a red circle on a striped background, well exposed, harmonious colours, "
              "well composed, high quality, smooth, beautiful",
    "k_list": "a red circle on a striped background, in focus, minimal, well exposed",
    "kw_dict": "a red circle on a striped background, colour: matching colours, "
               "mood: stunning, style: minimal",
    "repeat": "a red circle on a striped background, a red circle on a striped background, "
              "stunning, noise-free",
    "reorg": "a red circle on a striped background, high quality, well framed, well exposed, "
             "matching colours, beautiful",
}


@pytest.mark.parametrize("style", AESTHETIC_STYLES)
def test_lexicon_outputs_are_pinned(style):
  assert rephrase_query("a red circle on a striped background", style) == GOLDEN[style]


def test_lexicon_choice_depends_on_query_and_seed():
  details = {rephrase_query(q.text, "detail").split(", ", 1)[1]
             for q in world_text.all_queries()[:60]}
  assert len(details) > 10
  q = "a red circle"
  assert len({rephrase_query(q, "detail", seed=s) for s in range(10)}) > 3


def test_lexicon_does_not_repeat_a_keyword_the_query_already_has():
  for seed in range(20):
    text = rephrase_query("a sharp red cat, well lit", "detail", seed=seed)
    assert text.count("sharp") == 1 and text.count("well lit") == 1
    assert len(_world_phrases(text)) == 2 + 6  # the two it had + one more per aspect


def test_lexicon_vocabulary_from_json_and_clear_errors(tmp_path):
  good = {a: [f"{a} word"] for a in lexicon.ASPECTS}
  path = tmp_path / "words.json"
  path.write_text(json.dumps(good))
  assert rephrase_query("a cat", "detail", dictionary=lexicon.keyword_dictionary(str(path))) \
      == "a cat, " + ", ".join(f"{a} word" for a in lexicon.ASPECTS)
  path.write_text(json.dumps({"lighting": ["soft"]}))
  with pytest.raises(ValueError, match="rephrase.vocabulary.*no keywords for colour"):
    lexicon.keyword_dictionary(str(path))
  with pytest.raises(ValueError, match="rephrase.vocabulary"):
    lexicon.keyword_dictionary("poetic")


# ----------------------------------------------------------------------------- config


def _config(**overrides):
  c = rephrase.default_config()
  c.update(overrides)
  return c


def test_default_config_is_the_offline_lexicon_and_unknown_names_are_refused():
  r = rephrase.make_rephraser(rephrase.default_config())
  assert isinstance(r.backend, rephrase.LexiconBackend) and r.cache is None
  assert r.rephrase("a red cat") == rephrase_query("a red cat", r.style)
  with pytest.raises(ValueError, match="rephrase.backend.*'gpt'"):
    rephrase.make_rephraser(_config(backend="gpt"))
  with pytest.raises(ValueError, match="rephrase.style.*'poem'"):
    rephrase.make_rephraser(_config(style="poem"))
  with pytest.raises(ValueError, match="rephrase.num_keywords"):
    rephrase.make_rephraser(_config(num_keywords=0))
  with pytest.raises(ValueError, match="rephrase.model"):
    rephrase.make_rephraser(_config(backend="hf"))
  with pytest.raises(FileNotFoundError, match="rephrase.model"):
    rephrase.make_rephraser(_config(backend="hf", model="/nonexistent/folder"))


# ----------------------------------------------------------------------------- policy & cache


class FakeBackend:
  """Answers '<query>, nice'; fails for queries in `fail`; counts the queries it is asked."""
  name, model, cacheable = "fake", "m1", True

  def __init__(self, fail=(), crash=False):
    self.fail, self.crash, self.asked = set(fail), crash, []

  def complete(self, queries, style):
    self.asked += list(queries)
    if self.crash:
      raise RuntimeError("model fell over")
    return [Attempt(None, "boom") if q in self.fail else Attempt(f"{q}, nice") for q in queries]


def test_failures_fall_back_to_the_original_query_are_counted_and_listed(caplog):
  backend = FakeBackend(fail={"b"})
  result = Rephraser(backend, "detail").rephrase_batch(["a", "b", "", "a"])
  assert result.texts == ["a, nice", "b", "", "a, nice"]
  assert result.status == ["ok", "fallback", "fallback", "ok"]
  assert backend.asked == ["a", "b"]  # duplicates asked once, empty never
  summary = result.summary()
  assert (summary["ok"], summary["fallbacks"], summary["backend_calls"]) == (2, 2, 2)
  assert summary["fallback_list"] == [dict(query="b", reason="boom"),
                                      dict(query="", reason="empty query")]
  json.dumps(summary)
  assert "2 of 4 queries fell back" in caplog.text


def test_tally_counts_fallbacks_cache_hits_and_backend_calls_over_every_call(tmp_path):
  with RephraseCache(tmp_path / "c.jsonl") as cache:
    rephraser = Rephraser(FakeBackend(fail={"b"}), "detail", cache=cache)
    first = rephraser.rephrase_batch(["a", "b", "", "a"])
    assert first.summary()["rate"] == 0.5
    with rephraser.counting() as block:
      rephraser.rephrase_batch(["a", "b", "c"])   # a from the cache; b fails again
  assert block.to_json() == dict(backend="fake", model="m1", style="detail", queries=3, ok=2,
                                 fallbacks=1, rate=1 / 3, from_cache=1, backend_calls=2,
                                 first_fallback=dict(query="b", reason="boom"))
  total = rephraser.tally.to_json()
  assert (total["queries"], total["ok"], total["fallbacks"], total["from_cache"],
          total["backend_calls"]) == (7, 4, 3, 1, 4)
  assert total["rate"] == 3 / 7 and total["first_fallback"] == dict(query="b", reason="boom")
  json.dumps(total)
  with rephraser.counting() as empty:
    pass
  assert empty.to_json()["rate"] is None and "first_fallback" not in empty.to_json()


def test_a_backend_that_raises_falls_back_for_its_batch_and_never_raises():
  result = Rephraser(FakeBackend(crash=True), "detail").rephrase_batch(["a", "b"])
  assert result.texts == ["a", "b"] and result.num_fallbacks == 2
  assert "model fell over" in result.reasons[0]


def test_cache_second_run_makes_no_backend_calls(tmp_path):
  path = tmp_path / "sub" / "cache.jsonl"
  first = FakeBackend(fail={"q2"})
  with RephraseCache(path) as cache:
    r1 = Rephraser(first, "detail", cache=cache).rephrase_batch(["q0", "q1", "q2"])
  assert first.asked == ["q0", "q1", "q2"] and len(path.read_text().splitlines()) == 2
  second = FakeBackend()
  with RephraseCache(path) as cache:
    r2 = Rephraser(second, "detail", cache=cache).rephrase_batch(["q0", "q1", "q2"])
  assert second.asked == ["q2"]  # only the fallback is retried
  assert r2.texts == ["q0, nice", "q1, nice", "q2, nice"] and r2.from_cache == [True, True, False]
  third = FakeBackend()
  with RephraseCache(path) as cache:
    r3 = Rephraser(third, "detail", cache=cache).rephrase_batch(["q0", "q1", "q2"])
    # Another style, model or prompt is another key.
    assert Rephraser(third, "reorg", cache=cache).rephrase_batch(["q0"]).backend_calls == 1
  assert third.asked == ["q0"] and r3.backend_calls == 0 and r3.texts == r2.texts
  assert r1.texts[:2] == r3.texts[:2]


def test_cache_killed_run_resumes_with_its_finished_entries(tmp_path, caplog):
  path = tmp_path / "cache.jsonl"
  with RephraseCache(path) as cache:
    Rephraser(FakeBackend(), "detail", cache=cache).rephrase_batch(["q0", "q1", "q2"])
  data = path.read_bytes()
  path.write_bytes(data[:-15])  # killed in the middle of writing the third entry
  backend = FakeBackend()
  with caplog.at_level(logging.WARNING):
    with RephraseCache(path) as cache:
      assert len(cache) == 2 and cache.skipped_lines == 1
      result = Rephraser(backend, "detail", cache=cache).rephrase_batch(["q0", "q1", "q2"])
  assert "unfinished last line" in caplog.text
  assert backend.asked == ["q2"] and result.num_ok == 3
  lines = path.read_text().splitlines()
  assert [json.loads(l)["query"] for l in lines] == ["q0", "q1", "q2"]  # partial line removed


def test_cache_skips_corrupt_lines_with_a_warning_naming_the_line(tmp_path, caplog):
  path = tmp_path / "cache.jsonl"
  with RephraseCache(path) as cache:
    cache.put("fake", "m1", "detail", "p", "q0", "q0, nice")
    cache.put("fake", "m1", "detail", "p", "q1", "q1, nice")
  good = path.read_text().splitlines()
  tampered = json.loads(good[1]) | {"query": "other"}
  path.write_text("\n".join([good[0], "{not json", json.dumps(tampered), ""]))
  with caplog.at_level(logging.WARNING):
    cache = RephraseCache(path)
  assert len(cache) == 1 and cache.get("fake", "m1", "detail", "p", "q0") == "q0, nice"
  assert "line 2" in caplog.text and "line 3" in caplog.text
  cache.close()


def test_lexicon_is_never_cached(tmp_path):
  path = tmp_path / "c.jsonl"
  r = rephrase.make_rephraser(_config(), cache_path=str(path))
  r.rephrase_batch(QUERIES)
  assert r.cache is None and not path.exists()


# ----------------------------------------------------------------------------- hf backend

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tiny_lm_folder(folder, chat_template=None):
  """A 1-layer Llama with random weights and a 300-token BPE trained here, saved to folder."""
  torch = pytest.importorskip("torch")   # the hf backend's tests skip without torch
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [prompts.SYSTEM_PROMPT, *prompts.TEMPLATES.values(), *QUERIES] * 3
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              bos_token="<s>", eos_token="</s>")
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(folder)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
      pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
      eos_token_id=fast.eos_token_id)
  transformers.LlamaForCausalLM(config).save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
  return {"plain": _tiny_lm_folder(tmp_path_factory.mktemp("plain_lm")),
          "chat": _tiny_lm_folder(tmp_path_factory.mktemp("chat_lm"), CHAT_TEMPLATE)}


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_hf_end_to_end_batches_bounds_length_and_parses(lm_folders, kind, tmp_path):
  config = _config(backend="hf", model=lm_folders[kind], max_new_tokens=7, batch_size=2,
                   style="k_list")
  rephraser = rephrase.make_rephraser(config, cache_path=str(tmp_path / "c.jsonl"))
  backend = rephraser.backend
  assert backend.tokenizer.padding_side == "left"
  assert backend.use_chat_template == (kind == "chat")
  prompt = backend.prompt("k_list", QUERIES[0])
  if kind == "chat":
    assert prompt.startswith("<|system|>") and prompt.endswith("<|assistant|>")
  else:
    assert prompt == prompts.plain_prompt("k_list", QUERIES[0])

  calls = []
  generate = backend.lm.generate

  def spy(**kwargs):
    out = generate(**kwargs)
    calls.append((kwargs["input_ids"].shape, out.shape))
    return out

  backend.lm.generate = spy
  result = rephraser.rephrase_batch(QUERIES)
  assert [shape[0] for shape, _ in calls] == [2, 2, 1]  # 5 queries in batches of 2
  for (batch, prompt_len), (_, total_len) in calls:
    assert 1 <= total_len - prompt_len <= 7
  raw = backend.generate([backend.prompt("k_list", q) for q in QUERIES])
  for query, answer, text, status in zip(QUERIES, raw, result.texts, result.status):
    parsed = prompts.parse_answer(answer, "k_list")
    assert (status == "ok") == bool(parsed)
    assert text == (" ".join(parsed.split()) if parsed else query)
    assert text.isprintable() and text == text.strip()
  # Left padding: a row's greedy answer does not depend on its batch mates.
  alone = [backend.generate([backend.prompt("k_list", q)])[0] for q in QUERIES[:3]]
  assert alone == raw[:3]
  # A rerun is served by the cache: only the first run's fallbacks are generated again.
  calls.clear()
  again = rephraser.rephrase_batch(QUERIES)
  assert sum(shape[0] for shape, _ in calls) == result.num_fallbacks == again.backend_calls
  assert again.texts == result.texts


def test_hf_generation_failure_falls_back_without_raising(lm_folders):
  rephraser = rephrase.make_rephraser(_config(backend="hf", model=lm_folders["plain"]))

  def broken(**kwargs):
    raise RuntimeError("out of memory")

  rephraser.backend.lm.generate = broken
  result = rephraser.rephrase_batch(QUERIES[:2])
  assert result.texts == QUERIES[:2] and result.num_fallbacks == 2
  assert "out of memory" in result.reasons[0]


def test_hf_refuses_unbounded_generation(lm_folders):
  with pytest.raises(ValueError, match="rephrase.max_new_tokens"):
    rephrase.make_rephraser(_config(backend="hf", model=lm_folders["plain"],
                                    max_new_tokens=100_000))
