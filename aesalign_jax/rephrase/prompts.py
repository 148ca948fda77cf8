"""Prompt styles for aesthetic query rephrasing, and the parser that reads an LLM's answer.

The paper compares the styles original, `<detail>`, `<k list>`, `<kw dict>`, repeat and
`<reorg>`; it does not publish its prompts, so the templates below are ours (PAPER.md, OURS).
Every template asks for ONE line that is itself a search query (not an essay, not a list of
options) and that states aesthetic expectations: style, composition, lighting, colour, mood.
'original' is the query unchanged: no LLM is asked.

LLMs still add preambles ("Sure! Here is..."), quotes, numbering, markdown and explanations,
so `parse_answer` extracts one clean query line, or None when nothing usable is left (an empty
answer or a refusal); the caller then falls back to the original query.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

STYLES = ("original", "detail", "k_list", "kw_dict", "repeat", "reorg")

SYSTEM_PROMPT = (
    "You rewrite image search queries so that a search engine returns beautiful images. "
    "Keep the subject of the query. Answer with exactly one line: the new search query "
    "itself, with no preamble, quotes, numbering or explanation.")

# One user message per style; {query} is the user's query, {k} the number of keywords.
TEMPLATES = {
    # <detail>: the query enriched with a short description of how a pleasing image looks.
    "detail": (
        "Rewrite this image search query into one detailed search query that keeps its "
        "subject and adds what a beautiful image of it looks like: style, composition, "
        "lighting, colour and mood. At most 40 words, one line.\n"
        "Query: {query}"),
    # <k list>: the query followed by k aesthetic keywords.
    "k_list": (
        "Answer with one line: the image search query below, then {k} keywords that describe "
        "the aesthetics a viewer expects of it (style, composition, lighting, colour or mood), "
        "all separated by commas.\n"
        "Query: {query}"),
    # <kw dict>: aspect: keyword pairs, flattened onto one line.
    "kw_dict": (
        "Describe the ideal image for this search query as 'aspect: keyword' pairs for the "
        "aspects subject, style, composition, lighting, colour and mood. Answer with one line "
        "of comma-separated pairs starting with 'subject: {query}'.\n"
        "Query: {query}"),
    # repeat: the query restated, its subject repeated for emphasis, with aesthetic emphasis.
    "repeat": (
        "Restate this image search query in one line, repeating its subject for emphasis and "
        "stressing that the image must be beautiful: a pleasing style, composition, lighting, "
        "colour and mood.\n"
        "Query: {query}"),
    # <reorg>: the query reorganised into a fixed order of aspects.
    "reorg": (
        "Reorganise this image search query into one line in the order: subject, style, "
        "composition, lighting, colour, mood. Keep the subject's words and fill the other "
        "aspects with what a beautiful image of it would have. Comma-separated, one line.\n"
        "Query: {query}"),
}


def check_style(style: str, key: str = "rephrase.style") -> str:
  """Returns `style` if known, else raises naming the config key."""
  if style not in STYLES:
    raise ValueError(f"{key} must be one of {', '.join(STYLES)}; got {style!r}")
  return style


def user_prompt(style: str, query: str, k: int = 3) -> str:
  """The user message that asks for a rephrasing of `query` in `style` (not 'original')."""
  check_style(style)
  if style == "original":
    raise ValueError("style 'original' keeps the query unchanged and has no prompt")
  return TEMPLATES[style].format(query=" ".join(query.split()), k=int(k))


def chat_messages(style: str, query: str, k: int = 3) -> list[dict]:
  """OpenAI-style chat messages (system + user) for one query."""
  return [{"role": "system", "content": SYSTEM_PROMPT},
          {"role": "user", "content": user_prompt(style, query, k)}]


def plain_prompt(style: str, query: str, k: int = 3) -> str:
  """One text prompt for a base LM without a chat template; the answer continues it."""
  return f"{SYSTEM_PROMPT}\n\n{user_prompt(style, query, k)}\nSearch query:"


def prompt_fingerprint(style: str, k: int = 3) -> str:
  """12 hex digits naming the exact prompt of `style` (cache keys change when a prompt does)."""
  if style == "original":
    return "none"
  text = json.dumps([SYSTEM_PROMPT, TEMPLATES[check_style(style)], int(k)])
  return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------
# Parsing an answer.

_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_FENCE = re.compile(r"^\s*```[\w-]*\s*$")
# "1. ", "2) ", "- ", "* ", "• ", "> ", "### ": list markers, quote marks and headings.
_MARKER = re.compile(r"^\s*(?:(?:\d{1,2}|[a-zA-Z])[.)]\s+|[-*+•·>]+\s+|#{1,6}\s+)")
_HEADING = re.compile(r"^\s*#{1,6}\s")
_EMPHASIS = re.compile(r"(\*\*|__|\*|`)")
_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "„": "“", "`": "`"}
# Openers of a chatty preamble ("Sure! Here is ...:", "Certainly, here's", "Here is ...").
_CHATTY = re.compile(
    r"^(?:(?:sure|certainly|of course|absolutely|okay|ok|alright|great|no problem"
    r"|happy to help)\s*[,!.:]|here(?:'s| is| are| you go)\b)", re.I)
_ABOUT_ANSWER = re.compile(r"\b(?:here|query|queries|rephras\w*|rewrit\w*|version|prompt|search)",
                           re.I)
# A label before the answer on the same line: "Rephrased query:", "Search query:" ...
_LABEL = re.compile(
    r"^(?:[\w' ]{0,40}?\b(?:query|queries|prompt|rephras\w*|rewrit\w*|version|answer|result|"
    r"output|search|keywords?))\s*:\s*", re.I)
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry\b|i can(?:no|')t|i cannot|i won'?t|i am unable|"
    r"i'?m unable|as an ai\b|unfortunately\b)", re.I)
# Start of an explanation after the query on the same line.
_EXPLANATION = re.compile(
    r"(?:\s+[-–—]\s+|\s*[.!]\s+|\s+\()(?=(?:this|these|it|that|the query|the rephras\w*|"
    r"note|explanation|i\b|i'|here|which)\b)", re.I)
_EXPLAIN_LINE = re.compile(
    r"^(?:this|these|it|that|note|explanation|the query|the rephras\w*|i\b|i')", re.I)
_KEY_VALUE = re.compile(r"^[A-Za-z][\w ]{0,24}:\s*\S")
_MAX_WORDS = 60


def _unquote(text: str) -> str:
  """Strips surrounding quotes; for a quoted answer followed by a comment, keeps the quote."""
  text = text.strip()
  while (len(text) >= 2 and text[0] in _PAIRS and text[-1] == _PAIRS[text[0]]
         and _PAIRS[text[0]] not in text[1:-1]):
    text = text[1:-1].strip()
  if text and text[0] in _PAIRS:
    close = text.find(_PAIRS[text[0]], 1)
    rest = text[close + 1:].strip() if close > 1 else None
    if rest is not None and (not rest or rest[0] in "-–—(.:;,!"):
      return text[1:close].strip()
  return text


def _clean_line(line: str) -> str:
  line = _MARKER.sub("", line)
  return _EMPHASIS.sub("", line).strip()


def _strip_preamble(line: str) -> str:
  """Removes chatty openers and labels at the start of a line (may leave '')."""
  for _ in range(4):
    before = line
    chatty = _CHATTY.match(line)
    if chatty:
      # Drop the chatty sentence up to its first ':', '!' or '.'; with none, drop the line if
      # it talks about the answer ("Here is a rephrased query") else only the opener.
      end = re.search(r"[:!.](\s|$)", line)
      if end:
        line = line[end.end():]
      else:
        line = "" if _ABOUT_ANSWER.search(line) else line[chatty.end():]
    line = _LABEL.sub("", line.strip(), count=1)
    line = _unquote(_clean_line(line))
    if line == before:
      break
  return line


def _is_preamble_only(line: str) -> bool:
  return line.endswith(":") and len(line.split()) <= 12


def parse_answer(answer: str | None, style: str | None = None,
                 max_words: int = _MAX_WORDS) -> str | None:
  """One clean search-query line from an LLM answer, or None if nothing usable is left.

  Removes reasoning blocks (<think>), control characters, code fences, preambles ("Sure! Here
  is the query:"), labels ("Rephrased query:"), markdown headings, list numbering and bullets,
  markdown emphasis, surrounding quotes, blank lines, and explanations after the query (later
  lines, or "- This adds ..." on the same line). Of alternatives on several lines the first
  is kept, except for the list-like styles, whose items are joined with ', ' (k_list:
  keywords one per line; kw_dict: one 'aspect: keyword' per line); a JSON object answer to
  kw_dict is flattened.
  A refusal ("I'm sorry, I can't...") gives None. At most `max_words` words are kept.
  """
  if not isinstance(answer, str):
    return None
  # Control characters and U+FFFD (bytes a tokenizer could not decode) are never query text.
  text = "".join(ch for ch in _THINK.sub("", answer) if ch in "\n\t" or (
      ch != "\ufffd" and unicodedata.category(ch)[0] != "C"))
  lines = [l for l in text.splitlines() if not _FENCE.match(l)]
  if style == "kw_dict":
    flat = _flatten_json(" ".join(lines))
    if flat:
      lines = [flat]
  cleaned, headings = [], []
  for raw in lines:
    line = _strip_preamble(_clean_line(raw.strip()))
    if _HEADING.match(raw) and line:
      headings.append(line)  # a title ("### Search query"); the answer only if nothing else is
      continue
    if not line or _is_preamble_only(line) or not re.search(r"\w", line):
      if cleaned and not raw.strip():
        break  # a blank line ends the answer block; what follows is commentary
      continue
    if _REFUSAL.match(line):
      if not cleaned:
        return None
      break
    if cleaned and _EXPLAIN_LINE.match(line):
      break
    cleaned.append(line)
  if not cleaned:
    cleaned = headings[:1]
  if not cleaned:
    return None
  if style == "k_list" and len(cleaned) > 1 and all(len(l.split()) <= 6 for l in cleaned):
    query = ", ".join(l.rstrip(",;.") for l in cleaned)
  elif style == "kw_dict" and len(cleaned) > 1 and all(_KEY_VALUE.match(l) for l in cleaned):
    query = ", ".join(l.rstrip(",;.") for l in cleaned)
  else:
    query = cleaned[0]
  query = _EXPLANATION.split(query, maxsplit=1)[0]
  query = _unquote(query).strip().rstrip(".;:,!").strip()
  query = " ".join(query.split()[:max_words])
  if not re.search(r"\w", query) or _REFUSAL.match(query):
    return None
  return query


def _flatten_json(text: str) -> str | None:
  """'{"subject": "a cat", "lighting": "soft"}' -> 'subject: a cat, lighting: soft'."""
  text = text.strip()
  start, end = text.find("{"), text.rfind("}")
  if start < 0 or end <= start:
    return None
  try:
    obj = json.loads(text[start:end + 1])
  except ValueError:
    return None
  if not isinstance(obj, dict) or not obj:
    return None
  parts = []
  for key, value in obj.items():
    if isinstance(value, (list, tuple)):
      value = ", ".join(str(v) for v in value)
    parts.append(f"{key}: {value}")
  return ", ".join(parts)
