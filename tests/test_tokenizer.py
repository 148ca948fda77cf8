"""ClipTokenizer: fixed-length ids with the end token where the text tower pools, from a CLIP
checkpoint folder or from a BPE trained on captions, both behind one interface."""

import itertools
import json
import os

import numpy as np
import pytest
import transformers
from tokenizers.pre_tokenizers import ByteLevel

from aesalign_jax import tokenizer as tokenizer_lib
from aesalign_jax.tokenizer import ClipTokenizer, train_bpe

CONTEXT = 12
# Merged tokens of the tiny CLIP vocabulary: the pairs, in merge order.
MERGES = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>")]
TEXTS = ["", "a", "the red cat", "The  RED cat, on a mat!", "a red cat " * 10,
         "a red <|endoftext|> cat", "ünïcödé 東京 🙂"]


def _clip_vocab():
  """CLIP's layout in miniature: bytes, bytes + '</w>', merges, then the two special tokens."""
  alphabet = sorted(ByteLevel.alphabet())
  tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in MERGES]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(tokens)}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """A CLIP checkpoint's tokenizer files plus a config.json whose text tower has CONTEXT positions."""
  folder = tmp_path_factory.mktemp("clip")
  transformers.CLIPTokenizer(vocab=_clip_vocab(), merges=MERGES).save_pretrained(folder)
  transformers.CLIPConfig(text_config=dict(max_position_embeddings=CONTEXT)).save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def clip_tok(clip_folder):
  return ClipTokenizer.from_folder(clip_folder)


def _captions(n=300):
  colours = ["red", "green", "blue", "yellow", "purple", "orange"]
  shapes = ["circle", "square", "triangle", "star"]
  backs = ["plain", "striped", "dotted", "checkered"]
  words = ["sharp", "grainy", "harmonious colours", "badly framed", "bright"]
  combos = itertools.cycle(itertools.product(colours, shapes, backs))
  out = []
  for i in range(n):
    c, s, b = next(combos)
    extra = f", {words[i % len(words)]}" if i % 3 == 0 else ""
    out.append(f"A {c} {s} on a {b} background{extra}")
  return out


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("bpe")
  train_bpe(_captions(), vocab_size=400, folder=folder, context_length=16)
  return folder


def _unpadded(hf, text):
  return hf(text)["input_ids"]


# ---------------------------------------------------------------- CLIP checkpoint folder

def test_clip_folder_matches_transformers_padded_to_context_length(clip_folder, clip_tok):
  reference = transformers.AutoTokenizer.from_pretrained(clip_folder, local_files_only=True)
  out = clip_tok(TEXTS)
  expected = reference(TEXTS, padding="max_length", truncation=True, max_length=CONTEXT)
  assert out["ids"].dtype == np.int32 and out["eos_index"].dtype == np.int32
  assert out["ids"].shape == (len(TEXTS), CONTEXT) and out["eos_index"].shape == (len(TEXTS),)
  np.testing.assert_array_equal(out["ids"], np.array(expected["input_ids"]))
  assert clip_tok.context_length == CONTEXT  # from config.json's text_config
  assert clip_tok.pad_token_id == reference.pad_token_id
  assert clip_tok.eos_token_id == reference.eos_token_id == len(_clip_vocab()) - 1
  assert clip_tok.vocab_size == len(_clip_vocab())


def test_mixed_length_batch_has_end_token_then_padding(clip_folder, clip_tok):
  hf = clip_tok.hf_tokenizer
  out = clip_tok(TEXTS)
  for row, eos, text in zip(out["ids"], out["eos_index"], TEXTS):
    full = _unpadded(hf, text)
    if "<|endoftext|>" in text:
      continue  # covered by the pooling test: the literal end token comes first
    assert eos == min(len(full), CONTEXT) - 1, text
    assert row[0] == hf.bos_token_id and row[eos] == clip_tok.eos_token_id
    assert (row[eos + 1:] == clip_tok.pad_token_id).all()
  assert len(set(out["eos_index"].tolist())) > 3  # the batch really mixes lengths


def test_truncation_keeps_end_token_at_last_position(clip_tok):
  text = "the red cat " * 20
  full = _unpadded(clip_tok.hf_tokenizer, text)
  assert len(full) > CONTEXT
  out = clip_tok([text, "a"])
  assert out["eos_index"][0] == CONTEXT - 1
  assert out["ids"][0, -1] == clip_tok.eos_token_id
  np.testing.assert_array_equal(out["ids"][0, :-1], full[:CONTEXT - 1])


@pytest.mark.parametrize("legacy_eos_id", [False, True])
def test_eos_index_is_where_transformers_clip_pools(clip_tok, legacy_eos_id):
  """A random transformers CLIPTextModel pools exactly at eos_index, for the current config
  (first occurrence of eos_token_id) and for legacy configs (eos_token_id 2: argmax id)."""
  torch = pytest.importorskip("torch")
  tok = clip_tok
  eos_id = 2 if legacy_eos_id else tok.eos_token_id
  config = transformers.CLIPTextConfig(
      vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=CONTEXT, eos_token_id=eos_id,
      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(config).eval()
  out = tok(TEXTS)
  with torch.no_grad():
    result = model(input_ids=torch.from_numpy(out["ids"].astype(np.int64)))
  hidden = result.last_hidden_state.numpy()
  ours = hidden[np.arange(len(TEXTS)), out["eos_index"]]
  np.testing.assert_array_equal(ours, result.pooler_output.numpy())


def test_context_length_argument_overrides_and_is_bounded_by_config(clip_folder):
  assert ClipTokenizer.from_folder(clip_folder, context_length=8)(["a"])["ids"].shape == (1, 8)
  with pytest.raises(ValueError, match="config.json"):
    ClipTokenizer.from_folder(clip_folder, context_length=CONTEXT + 1)


def test_folder_without_context_length_asks_for_one(tmp_path):
  transformers.CLIPTokenizer(vocab=_clip_vocab(), merges=MERGES).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="pass context_length"):
    ClipTokenizer.from_folder(tmp_path)
  assert ClipTokenizer.from_folder(tmp_path, context_length=7).context_length == 7


def test_bare_vocab_and_merges_folder_loads_as_clip(tmp_path, clip_tok):
  """Older checkpoints ship only vocab.json + merges.txt (and config.json)."""
  with open(tmp_path / "vocab.json", "w") as f:
    json.dump(_clip_vocab(), f)
  with open(tmp_path / "merges.txt", "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
  tok = ClipTokenizer.from_folder(tmp_path, context_length=CONTEXT)
  np.testing.assert_array_equal(tok(TEXTS)["ids"], clip_tok(TEXTS)["ids"])


def test_missing_or_empty_folder_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    ClipTokenizer.from_folder(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    ClipTokenizer.from_folder(tmp_path)


def test_single_string_and_non_strings_are_refused(clip_tok):
  with pytest.raises(TypeError, match="single str"):
    clip_tok("a red cat")
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    clip_tok(["a", 3])
  assert clip_tok([])["ids"].shape == (0, CONTEXT)


# ---------------------------------------------------------------- BPE trained on captions

def test_bpe_saves_a_transformers_folder_that_reloads_identically(bpe_folder):
  files = set(os.listdir(bpe_folder))
  assert {"tokenizer.json", "tokenizer_config.json"} <= files
  with open(bpe_folder / "tokenizer_config.json") as f:
    assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
  first = ClipTokenizer.from_folder(bpe_folder)
  again = ClipTokenizer.from_folder(bpe_folder)
  texts = _captions(40) + TEXTS
  a, b = first(texts), again(texts)
  np.testing.assert_array_equal(a["ids"], b["ids"])
  np.testing.assert_array_equal(a["eos_index"], b["eos_index"])
  assert first.context_length == 16 and a["ids"].shape == (len(texts), 16)


def test_bpe_returned_tokenizer_equals_reloaded(tmp_path):
  trained = train_bpe(_captions(), vocab_size=400, folder=tmp_path, context_length=16)
  reloaded = ClipTokenizer.from_folder(tmp_path)
  texts = _captions(40) + TEXTS
  np.testing.assert_array_equal(trained(texts)["ids"], reloaded(texts)["ids"])


def test_bpe_training_is_deterministic(bpe_folder, tmp_path):
  train_bpe(_captions(), vocab_size=400, folder=tmp_path, context_length=16)
  with open(bpe_folder / "tokenizer.json") as f1, open(tmp_path / "tokenizer.json") as f2:
    assert json.load(f1) == json.load(f2)


def test_bpe_special_tokens_take_the_last_ids_like_clip(bpe_folder):
  tok = ClipTokenizer.from_folder(bpe_folder)
  assert tok.vocab_size <= 400
  assert tok.eos_token_id == tok.vocab_size - 1 and tok.bos_token_id == tok.vocab_size - 2
  assert tok.pad_token_id == tok.eos_token_id
  out = tok(_captions(50))
  assert (out["ids"][:, 0] == tok.bos_token_id).all()
  assert (out["ids"][np.arange(50), out["eos_index"]] == tok.eos_token_id).all()
  assert out["ids"].max() == tok.eos_token_id  # nothing beyond the embedding table


def test_bpe_merges_frequent_caption_words_into_single_tokens(bpe_folder):
  tok = ClipTokenizer.from_folder(bpe_folder, context_length=32)
  out = tok(["triangle", "background"])
  assert (out["eos_index"] == 2).all()  # begin, the word, end


def test_bpe_encodes_unseen_words_lowercased_without_unknown_tokens(bpe_folder):
  tok = ClipTokenizer.from_folder(bpe_folder, context_length=64)
  text = "A Zebra-like thing, ünïcödé 東京 🙂 42"
  out = tok([text])
  assert out["eos_index"][0] < 63  # not truncated
  assert tok.decode(out["ids"][0]).strip() == text.lower()


def test_bpe_truncation_keeps_end_token(bpe_folder):
  tok = ClipTokenizer.from_folder(bpe_folder)
  out = tok(["a red circle " * 30, "a"])
  assert out["eos_index"][0] == 15 and out["ids"][0, 15] == tok.eos_token_id
  assert out["eos_index"][1] < 15


def test_bpe_refuses_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    train_bpe(_captions(), vocab_size=200, folder=tmp_path)
  with pytest.raises(ValueError, match="context_length"):
    train_bpe(_captions(), vocab_size=400, folder=tmp_path, context_length=1)
  with pytest.raises(ValueError, match="no captions"):
    train_bpe([], vocab_size=400, folder=tmp_path)
  with pytest.raises(TypeError, match=r"captions\[1\]"):
    train_bpe(["a", None], vocab_size=400, folder=tmp_path)


def test_default_config_trains_a_usable_tokenizer(tmp_path):
  c = tokenizer_lib.default_config()
  tok = train_bpe(_captions(), c.vocab_size, tmp_path, c.context_length,
                  min_frequency=c.min_frequency)
  assert tok(["a red circle"])["ids"].shape == (1, c.context_length)
