"""The `hf` rephraser: a local transformers causal LM, batched greedy generation.

The model and tokenizer load from a folder with local files only (never the hub). A tokenizer
with a chat template gets the system + user messages through it; one without gets the plain
prompt (prompts.plain_prompt). Prompts are left-padded so that every row's answer starts at
the same position, generation is greedy and stops after max_new_tokens, and each answer goes
through prompts.parse_answer. Runs on any torch device (cpu, cuda, cuda:1, mps).
torch is needed only here, and imported only when this backend is built.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from aesalign_jax.rephrase import prompts
from aesalign_jax.rephrase.core import Attempt

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS_LIMIT = 1024
_DTYPES = ("auto", "float32", "bfloat16", "float16")


class HFBackend:
  """Backend `hf`: `folder` holds a transformers causal LM (config.json, weights, tokenizer)."""

  name = "hf"
  cacheable = True

  def __init__(self, folder: str | os.PathLike, *, device: str = "cpu",
               max_new_tokens: int = 64, batch_size: int = 16, k: int = 3,
               dtype: str = "auto"):
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
      raise FileNotFoundError(f"rephrase.model: {folder!r} is not a transformers model folder "
                              "(no config.json)")
    if not 1 <= int(max_new_tokens) <= MAX_NEW_TOKENS_LIMIT:
      raise ValueError(f"rephrase.max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}]; got "
                       f"{max_new_tokens}")
    if int(batch_size) < 1:
      raise ValueError(f"rephrase.batch_size must be >= 1; got {batch_size}")
    if dtype not in _DTYPES:
      raise ValueError(f"rephrase.dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    import torch  # only now: the checks above need neither torch nor transformers
    import transformers

    self.model = os.path.abspath(folder)
    self.max_new_tokens = int(max_new_tokens)
    self.batch_size = int(batch_size)
    self.k = int(k)
    self._torch = torch
    self.device = torch.device(device)

    self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    self.tokenizer.padding_side = "left"
    if self.tokenizer.pad_token_id is None:
      if self.tokenizer.eos_token_id is None:
        raise ValueError(f"rephrase.model: the tokenizer in {folder} has neither a pad nor an "
                         "end-of-sequence token; set one in its tokenizer_config.json")
      self.tokenizer.pad_token = self.tokenizer.eos_token
    self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    kwargs = {} if dtype == "auto" else {_dtype_kwarg(transformers): getattr(torch, dtype)}
    self.lm = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, **kwargs).to(self.device).eval()
    eos = self.tokenizer.eos_token_id
    self.generation_config = transformers.GenerationConfig(
        max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=self.tokenizer.pad_token_id,
        eos_token_id=eos if eos is not None else self.lm.config.eos_token_id)

  def prompt(self, style: str, query: str) -> str:
    """The exact text fed to the model for one query."""
    if not self.use_chat_template:
      return prompts.plain_prompt(style, query, self.k)
    messages = prompts.chat_messages(style, query, self.k)
    try:
      return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    except Exception:  # pylint: disable=broad-except
      # Some templates (Gemma's, Mistral's older ones) reject a system role: fold it into
      # the user message.
      merged = [{"role": "user",
                 "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
      return self.tokenizer.apply_chat_template(merged, tokenize=False,
                                                add_generation_prompt=True)

  def generate(self, texts: Sequence[str]) -> list[str]:
    """Raw greedy continuations of `texts` (one batch), at most max_new_tokens tokens each."""
    torch = self._torch
    # A chat template writes its own begin token; the plain prompt gets the tokenizer's.
    enc = self.tokenizer(list(texts), return_tensors="pt", padding=True,
                         add_special_tokens=not self.use_chat_template).to(self.device)
    with torch.inference_mode():
      out = self.lm.generate(**enc, generation_config=self.generation_config)
    new_tokens = out[:, enc["input_ids"].shape[1]:]
    return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

  def complete(self, queries: Sequence[str], style: str) -> list[Attempt]:
    """Parsed answers, batch by batch; a batch that fails falls back as a whole."""
    out = []
    for start in range(0, len(queries), self.batch_size):
      batch = list(queries[start:start + self.batch_size])
      try:
        answers = self.generate([self.prompt(style, q) for q in batch])
      except Exception as e:  # pylint: disable=broad-except
        logger.warning("hf rephraser: generation failed for queries %d..%d: %s: %s", start,
                       start + len(batch) - 1, type(e).__name__, e)
        out += [Attempt(None, f"generation failed: {type(e).__name__}: {e}")] * len(batch)
        continue
      for answer in answers:
        text = prompts.parse_answer(answer, style)
        out.append(Attempt(text, "" if text else "empty or refused answer"))
    return out


def _dtype_kwarg(transformers) -> str:
  """`dtype` since transformers 4.56; `torch_dtype` before."""
  major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
  return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
