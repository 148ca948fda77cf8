"""Text tokenizers with one interface for the model: texts -> fixed-length ids + end-token index.

Two sources, one class (`ClipTokenizer`):
- a Hugging Face CLIP checkpoint folder (real runs): transformers' own CLIP tokenizer, loaded
  from local files only;
- a small byte-level BPE trained on captions with the `tokenizers` library (the embedded
  world, `train_bpe`), saved as a transformers fast-tokenizer folder so that it loads back
  through the same `ClipTokenizer.from_folder`.

The text tower pools at the end token. transformers.CLIPModel pools at the FIRST occurrence of
`eos_token_id` (and, for legacy configs with eos_token_id == 2, at the argmax id, which is the
end token too because it holds the largest id), so `eos_index` is defined the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# transformers writes this sentinel (int(1e30)) as model_max_length when none was given.
_UNSET_MAX_LENGTH = 1_000_000


def default_config() -> ml_collections.ConfigDict:
  """Defaults of the `tokenizer` config section."""
  c = ml_collections.ConfigDict()
  # Folder holding the tokenizer: a Hugging Face CLIP checkpoint or a trained BPE.
  # None: train a BPE on the world's captions and save it in the workdir.
  c.folder = None
  # BPE only: the largest vocabulary (256 bytes + merges + 2 special tokens).
  c.vocab_size = 1024
  # Token positions per text (the text tower's max_position_embeddings). For a checkpoint
  # folder, None takes it from the folder's config.json.
  c.context_length = 32
  # BPE only: a pair must occur this often in the captions to become a merge.
  c.min_frequency = 2
  return c


class ClipTokenizer:
  """A transformers fast tokenizer that pads and truncates to the model's context length.

  Calling it on a list of texts returns `dict(ids=int32 [B, L], eos_index=int32 [B])`: every
  row starts with the begin token, ends with the end token (kept when the text is truncated),
  and is padded with the tokenizer's own pad id up to L.
  """

  def __init__(self, hf_tokenizer, context_length: int, source: str = "<in memory>"):
    """Wraps a loaded transformers tokenizer; prefer `from_folder` or `train_bpe`."""
    self._source = source
    if hf_tokenizer.eos_token_id is None:
      raise ValueError(f"tokenizer from {source} has no eos_token; the text tower pools at it "
                       "(set eos_token in tokenizer_config.json)")
    if hf_tokenizer.pad_token_id is None:
      # Padding positions are never pooled and are masked only causally, so any id works;
      # CLIP's own tokenizer pads with the end token.
      hf_tokenizer.pad_token = hf_tokenizer.eos_token
    if int(context_length) < 2:
      raise ValueError(f"context_length must be >= 2 (begin and end tokens), got {context_length}")
    self._hf = hf_tokenizer
    self._context_length = int(context_length)
    # Unpadded, so that a pad id equal to the end token cannot hide a missing end token.
    probe = hf_tokenizer("a")["input_ids"]
    if len(probe) < 2 or probe[-1] != hf_tokenizer.eos_token_id:
      raise ValueError(f"tokenizer from {source} does not append its end token "
                       f"{hf_tokenizer.eos_token!r}; the text tower pools at it (its "
                       "post-processor must add begin and end tokens)")

  @classmethod
  def from_folder(cls, folder: str | os.PathLike, context_length: int | None = None
                  ) -> ClipTokenizer:
    """Loads the tokenizer saved in `folder` (local files only, never the hub).

    `folder` is a Hugging Face CLIP checkpoint (tokenizer.json and/or vocab.json + merges.txt,
    tokenizer_config.json, usually config.json) or a folder written by `train_bpe`.
    context_length: None takes the text tower's max_position_embeddings from the folder's
    config.json, else the tokenizer's model_max_length; a value larger than config.json's
    position table is refused.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    hf = _load_hf_tokenizer(folder)
    positions = _max_positions_from_config(folder)
    if context_length is None:
      context_length = positions
    elif positions is not None and context_length > positions:
      raise ValueError(f"context_length {context_length} exceeds max_position_embeddings "
                       f"{positions} in {os.path.join(folder, 'config.json')}")
    if context_length is None:
      if hf.model_max_length is None or hf.model_max_length >= _UNSET_MAX_LENGTH:
        raise ValueError(f"no context length for the tokenizer in {folder}: config.json has no "
                         "text_config.max_position_embeddings and tokenizer_config.json no "
                         "model_max_length; pass context_length")
      context_length = hf.model_max_length
    return cls(hf, int(context_length), source=folder)

  def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Tokenizes a batch: `dict(ids=int32 [B, L], eos_index=int32 [B])`."""
    if isinstance(texts, str):
      raise TypeError("ClipTokenizer takes a list of texts, got a single str; wrap it in [...]")
    texts = list(texts)
    length = self._context_length
    if not texts:
      return dict(ids=np.zeros((0, length), np.int32), eos_index=np.zeros((0,), np.int32))
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    # Truncation happens before the post-processor adds the special tokens, so the end token
    # survives it (tokenizers reserves room for them).
    enc = self._hf(texts, padding="max_length", truncation=True, max_length=length,
                   return_attention_mask=False, return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    is_eos = ids == self.eos_token_id
    if not is_eos.any(axis=1).all():
      bad = int(np.flatnonzero(~is_eos.any(axis=1))[0])
      raise RuntimeError(f"tokenizer from {self._source} produced no end token for texts[{bad}]")
    # First occurrence, as transformers.CLIPModel pools (pad may equal the end token).
    eos_index = np.argmax(is_eos, axis=1).astype(np.int32)
    return dict(ids=ids, eos_index=eos_index)

  def decode(self, ids: Sequence[int]) -> str:
    """The text of one row of ids, special and padding tokens dropped."""
    return self._hf.decode(list(np.asarray(ids).tolist()), skip_special_tokens=True)

  def save(self, folder: str | os.PathLike) -> None:
    """Writes the tokenizer as a transformers folder that `from_folder` reads back."""
    os.makedirs(folder, exist_ok=True)
    self._hf.model_max_length = self._context_length
    self._hf.save_pretrained(os.fspath(folder))

  @property
  def hf_tokenizer(self):
    """The wrapped transformers tokenizer."""
    return self._hf

  @property
  def vocab_size(self) -> int:
    """Rows the token embedding needs: every id the tokenizer can emit, added tokens included."""
    return len(self._hf)

  @property
  def context_length(self) -> int:
    return self._context_length

  @property
  def eos_token_id(self) -> int:
    return int(self._hf.eos_token_id)

  @property
  def bos_token_id(self) -> int | None:
    return None if self._hf.bos_token_id is None else int(self._hf.bos_token_id)

  @property
  def pad_token_id(self) -> int:
    return int(self._hf.pad_token_id)


def _load_hf_tokenizer(folder: str):
  """AutoTokenizer from local files; CLIPTokenizer for a bare vocab.json + merges.txt folder."""
  import transformers  # imported here: slow to import, and only tokenizing needs it

  has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
  try:
    if has("tokenizer_config.json") or has("tokenizer.json"):
      return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if has("vocab.json") and has("merges.txt"):
      # An older checkpoint without tokenizer_config.json: AutoTokenizer cannot tell its class.
      # (Never CLIPTokenizer(vocab_file=..., merges_file=...): transformers 5 ignores those.)
      return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
  except Exception as e:  # transformers raises many types; name the folder in all of them
    raise ValueError(f"cannot load the tokenizer in {folder}: {e}") from e
  raise FileNotFoundError(f"no tokenizer in {folder}: expected tokenizer.json or "
                          "tokenizer_config.json, or vocab.json + merges.txt")


def _max_positions_from_config(folder: str) -> int | None:
  """text_config.max_position_embeddings of the folder's config.json, if it has one."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from e
  text_config = config.get("text_config") if isinstance(config, dict) else None
  # A CLIPTextModel config holds the key at the top level.
  source = text_config if isinstance(text_config, dict) else config
  value = source.get("max_position_embeddings") if isinstance(source, dict) else None
  return None if value is None else int(value)


def train_bpe(captions: Iterable[str], vocab_size: int, folder: str | os.PathLike,
              context_length: int = 77, *, min_frequency: int = 2) -> ClipTokenizer:
  """Trains a byte-level BPE on `captions`, saves it in `folder` and returns it loaded back.

  The pipeline: NFC, whitespace runs -> one space, lowercase; GPT-2's pre-tokenizer (splits
  words, digit runs, punctuation runs and whitespace; a leading space marks a word start); a
  byte alphabet, so every text encodes, unseen words and scripts included, with no unknown
  token; `<|startoftext|>` ... `<|endoftext|>` added by a post-processor, and padding with
  `<|endoftext|>` as CLIP does. The two special tokens take the last two ids, as in CLIP.

  vocab_size: the largest vocabulary, special tokens included (>= 258: 256 bytes + 2); a small
  corpus may yield fewer merges, so read the result's `vocab_size` to size the model.
  The folder holds tokenizer.json and tokenizer_config.json (a transformers fast tokenizer,
  model_max_length = context_length) and is read back with `ClipTokenizer.from_folder`.
  """
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
  from tokenizers import processors, trainers
  import transformers

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if int(vocab_size) < len(alphabet) + 2:
    raise ValueError(f"vocab_size must be >= {len(alphabet) + 2} (the byte alphabet and the "
                     f"two special tokens), got {vocab_size}")
  if int(context_length) < 2:
    raise ValueError(f"context_length must be >= 2 (begin and end tokens), got {context_length}")

  seen = 0

  def checked():
    nonlocal seen
    for i, caption in enumerate(captions):
      if not isinstance(caption, str):
        raise TypeError(f"captions[{i}] is {type(caption).__name__}, not str")
      seen += 1
      yield caption

  tok = Tokenizer(models.BPE(unk_token=None))
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase(),
      normalizers.Strip()])
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=int(vocab_size) - 2, min_frequency=int(min_frequency),
      initial_alphabet=alphabet, special_tokens=[], show_progress=False)
  tok.train_from_iterator(checked(), trainer=trainer)
  if seen == 0:
    raise ValueError("train_bpe got no captions")
  # Added after training so that they take the last ids (CLIP's layout: the end token is the
  # largest id, so even legacy argmax pooling finds it).
  tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
  bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(EOS_TOKEN)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
      special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)])

  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
      model_max_length=int(context_length))
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  hf.save_pretrained(folder)
  _portable_tokenizer_class(folder)
  return ClipTokenizer.from_folder(folder)


def _portable_tokenizer_class(folder: str) -> None:
  """Names the class every transformers version knows (v5 writes 'TokenizersBackend')."""
  path = os.path.join(folder, "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  with open(path, "w") as f:
    json.dump(config, f, indent=2)
