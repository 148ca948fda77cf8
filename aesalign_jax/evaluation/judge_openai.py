"""The `openai` system judge: an LMM behind an OpenAI-compatible /v1/chat/completions endpoint
that accepts images (GPT-4V-class models, vLLM or llama.cpp serving a vision model...).

One call sends the query and the two groups as base64 PNG data URLs (image_url content parts)
and asks for a strict JSON answer {"accuracy": "A"|"B"|"similar", "aesthetic": ...}. The
answer is parsed robustly (the first JSON object that holds both aspects, also inside a code
fence or after a preamble); a refusal, an answer without such an object, or a choice other than
A / B / similar is a failed call, with its reason.

Transport and safety are aesalign_jax.openai_client's, shared with the openai rephraser: the
API key comes from the environment variable NAMED in config, is sent only in the
Authorization header and redacted from every reason and log line; timeout_s per socket
operation; 429, 5xx, timeouts and connection errors retried with exponential backoff
(Retry-After honoured, every wait capped); redirects refused. Bounded concurrency comes from
judge_systems, which keeps at most max_concurrency calls in flight. Malformed answers are not
retried (temperature 0 would repeat them).
"""

from __future__ import annotations

import base64
import io
import json
import math

import ml_collections
import numpy as np
from PIL import Image

from aesalign_jax.evaluation.hpir import ASPECTS
from aesalign_jax.evaluation.judge_protocol import Group, query_text
from aesalign_jax.openai_client import OpenAIClient, OpenAIError, check_at_least, snippet

SYSTEM_PROMPT = (
    "You are an expert judge of image search results. You see a search query and two groups "
    "of images, A and B, each returned by a different search system for that query. Judge two "
    "aspects separately.\n"
    "accuracy: which group better matches the query - every object, attribute and setting "
    "the query asks for, in as many of its images as possible.\n"
    "aesthetic: which group is more beautiful as photographs - composition and framing, "
    "lighting and exposure, colour harmony, sharpness, clean uncluttered scenes - whatever "
    "the query.\n"
    "Answer \"similar\" for an aspect when neither group is clearly better on it. The order "
    "of the groups means nothing.\n"
    "Reply with only this JSON object and no other text:\n"
    '{"accuracy": "A" | "B" | "similar", "aesthetic": "A" | "B" | "similar"}')

_SIMILAR = frozenset({"similar", "tie", "same", "equal", "neither", "both", "none", "draw",
                      "no preference", "equally good", "comparable"})
_KEY_ALIASES = {"aesthetics": "aesthetic", "aesthetic quality": "aesthetic"}


def parse_verdict(text: str | None, aspects=ASPECTS) -> tuple[dict[str, str] | None, str]:
  """({aspect: 'A'|'B'|'similar'}, '') from an LMM's answer, or (None, why not).

  Takes the first JSON object in the text that holds every aspect (keys case-insensitive),
  so code fences and preambles are fine; choices may be 'A', 'b', 'Group A', 'tie'...
  """
  if text is None or not text.strip():
    return None, "empty answer (refusal?)"
  decoder = json.JSONDecoder()
  problem = ""
  start = text.find("{")
  while start != -1:
    try:
      obj, _ = decoder.raw_decode(text, start)
    except ValueError:
      obj = None
    if isinstance(obj, dict):
      fields = {_KEY_ALIASES.get(k.strip().lower(), k.strip().lower()): v
                for k, v in obj.items() if isinstance(k, str)}
      if all(a in fields for a in aspects):
        choices = {a: _choice(fields[a]) for a in aspects}
        if None not in choices.values():
          return choices, ""
        problem = problem or f"unrecognised choice in {json.dumps(obj)[:200]}"
      else:
        problem = problem or f"JSON object without {list(aspects)}: {json.dumps(obj)[:200]}"
    start = text.find("{", start + 1)
  start_of_text = snippet(text.encode("utf-8"))
  return None, problem or (f"no JSON verdict in the answer (refusal or malformed): "
                           f"{start_of_text!r}")


def _choice(value) -> str | None:
  if not isinstance(value, str):
    return None
  v = " ".join(value.strip().strip("\"'.!").lower().split())
  for prefix in ("group ", "system ", "set "):
    v = v.removeprefix(prefix)
  if v in ("a", "b"):
    return v.upper()
  return "similar" if v in _SIMILAR else None


class OpenAIJudge:
  """Judge `openai`: asks an LMM which of two image groups is better on each aspect."""

  aspects = ASPECTS

  def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
               timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0,
               max_backoff_s: float = 30.0, max_concurrency: int = 8,
               max_new_tokens: int = 200, temperature: float = 0.0,
               max_images_per_group: int = 10, image_side: int = 0, as_grid: bool = False,
               image_detail: str = ""):
    self.client = OpenAIClient(base_url, model, api_key_env=api_key_env, timeout_s=timeout_s,
                               max_retries=max_retries, backoff_s=backoff_s,
                               max_backoff_s=max_backoff_s, section="evals.judge",
                               who="the openai judge",
                               model_hint=" (one that accepts images)")
    check_at_least("evals.judge", (("max_concurrency", max_concurrency, 1),
                                   ("max_new_tokens", max_new_tokens, 1),
                                   ("max_images_per_group", max_images_per_group, 1),
                                   ("image_side", image_side, 0)))
    if image_detail not in ("", "low", "high", "auto"):
      raise ValueError(f"evals.judge.image_detail must be '', low, high or auto; "
                       f"got {image_detail!r}")
    self.model = model
    self.name = f"openai:{model}"
    self.max_concurrency = int(max_concurrency)
    self.max_new_tokens = int(max_new_tokens)
    self.temperature = float(temperature)
    self.max_images_per_group = int(max_images_per_group)
    self.image_side = int(image_side)
    self.as_grid = bool(as_grid)
    self.image_detail = image_detail

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "OpenAIJudge":
    """An OpenAIJudge from the `evals.judge` config section."""
    return cls(config.base_url, config.model, api_key_env=config.api_key_env,
               timeout_s=config.timeout_s, max_retries=config.max_retries,
               backoff_s=config.backoff_s, max_backoff_s=config.max_backoff_s,
               max_concurrency=config.max_concurrency, max_new_tokens=config.max_new_tokens,
               temperature=config.temperature,
               max_images_per_group=config.max_images_per_group,
               image_side=config.image_side, as_grid=config.as_grid,
               image_detail=config.image_detail)

  def __repr__(self) -> str:
    return f"OpenAIJudge(url={self.client.url!r}, model={self.model!r})"

  def redact(self, text: str) -> str:
    """`text` with the API key replaced by '***'."""
    return self.client.redact(text)

  def compare(self, query, group_a: Group, group_b: Group) -> dict[str, str] | None:
    """{aspect: 'A'|'B'|'similar'}, or None when the call failed."""
    return self.compare_explained(query, group_a, group_b)[0]

  def compare_explained(self, query, group_a: Group, group_b: Group
                        ) -> tuple[dict[str, str] | None, str]:
    """(verdict, '') or (None, why the call failed); never raises."""
    try:
      request = self.request_body(query, group_a, group_b)
    except Exception as e:  # pylint: disable=broad-except  # e.g. an unreadable image file
      return None, self.redact(f"could not build the request: {type(e).__name__}: {e}")
    try:
      text = self.client.chat(request, label=f"judge request for {query_text(query)!r}")
    except OpenAIError as e:  # one call never stops the run
      return None, str(e)
    if text is None:
      return None, "refused (the answer has no content)"
    verdict, why = parse_verdict(text)
    return verdict, self.redact(why)

  def request_body(self, query, group_a: Group, group_b: Group) -> dict:
    """The chat-completions request for one comparison (no key in it)."""
    content = [{"type": "text", "text": f'Search query: "{query_text(query)}"'}]
    for label, group in (("A", group_a), ("B", group_b)):
      images = self._images(group)
      count = "1 grid image" if self.as_grid else f"{len(images)} images"
      content.append({"type": "text", "text": f"Group {label} ({count}):"})
      if self.as_grid:
        images = [_grid(images)]
      for image in images:
        part = {"url": png_data_url(image)}
        if self.image_detail:
          part["detail"] = self.image_detail
        content.append({"type": "image_url", "image_url": part})
    content.append({"type": "text", "text": "Which group is better on accuracy, and which on "
                    "aesthetic? Reply with the JSON object only."})
    return dict(model=self.model, temperature=self.temperature,
                max_tokens=self.max_new_tokens, n=1,
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": content}])

  def _images(self, group: Group) -> list[np.ndarray]:
    m = self.max_images_per_group
    if group.images is not None:
      images = list(group.images[:m])
    elif group.paths is not None:
      images = []
      for path in group.paths[:m]:
        with Image.open(path) as im:
          images.append(np.asarray(im.convert("RGB")))
    else:
      raise ValueError("the openai judge needs the groups' images or image paths")
    return [_resize(im, self.image_side) for im in images]


def png_data_url(image: np.ndarray) -> str:
  """A data:image/png;base64 URL of a uint8 [H, W, 3] image."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _resize(image: np.ndarray, side: int) -> np.ndarray:
  """`image` with its longer side `side` pixels (0 = unchanged). Upscaling is nearest, so a
  blurred or noisy image is shown as it is, not smoothed."""
  h, w = image.shape[:2]
  if not side or max(h, w) == side:
    return image
  scale = side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  method = Image.NEAREST if scale > 1 else Image.LANCZOS
  return np.asarray(Image.fromarray(image).resize(size, method))


def _grid(images: list[np.ndarray], gap: int = 2) -> np.ndarray:
  """The images tiled row by row (about square) on white, each in a cell of the largest size."""
  cols = math.ceil(math.sqrt(len(images)))
  rows = math.ceil(len(images) / cols)
  ch = max(im.shape[0] for im in images)
  cw = max(im.shape[1] for im in images)
  out = np.full((rows * ch + (rows - 1) * gap, cols * cw + (cols - 1) * gap, 3), 255, np.uint8)
  for n, im in enumerate(images):
    y, x = (n // cols) * (ch + gap), (n % cols) * (cw + gap)
    out[y:y + im.shape[0], x:x + im.shape[1]] = im
  return out
