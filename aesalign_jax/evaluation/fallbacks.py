"""What a report's numbers rest on when an LLM is down: rephrasings that fell back to the
original query and judge calls that failed, counted per stage, and the numbers they touch.

A rephrasing that falls back leaves PT + rephrasing searching with the plain query, so its
numbers drift towards PT's (all of them equal PT's when every rephrasing fell back); a judge
call that fails excludes its query from that judge's rates. Neither stops the run, so the
report must say it happened. report.json gets

  fallbacks: {stage: {rephrase: counts, judge: {judge name: counts}}}
    rephrase counts (rephrase.RephraseTally): backend, model, style, queries (asked for),
      ok, fallbacks, rate (fallbacks / queries), from_cache, backend_calls, first_fallback;
      eval's adds `sections`: the same counts per evaluator section that rephrased;
    judge counts: calls (two per query and comparison), failed_calls, rate, queries,
      excluded_queries, first_failure, and `comparisons`: the same per comparison;
  degraded: {any, stages: {stage: [what fell back]}, metrics: {system: {metric: tags}},
             judge: {judge name: {comparison: tags}}, findings: {finding: tags},
             stage_numbers: {stage: {summary key: tags}} (e.g. mine's *_rephrased numbers)}
    where a tag is 'rephrase' (rests on rephrasings that fell back) or 'judge' (on failed
    judge calls); report.md marks those numbers with MARKERS.
"""

from __future__ import annotations

REPHRASE, JUDGE = 'rephrase', 'judge'
MARKERS = {REPHRASE: '†', JUDGE: '‡'}
# The system whose numbers depend on the rephraser (report.SYSTEMS).
REPHRASED_SYSTEM = 'PT+rephrase'


def rate(failed: int, total: int):
  return failed / total if total else None


def stage_rephrase(summary: dict) -> dict | None:
  """The rephrase counts of a stage summary's 'rephrase' entry (RephraseResult.summary, as
  the mine stage writes it; summaries written before the rate was added get it here)."""
  r = summary.get('rephrase')
  if not isinstance(r, dict) or 'fallbacks' not in r:
    return None
  out = {k: v for k, v in r.items() if k not in ('fallback_list', 'seconds')}
  out['rate'] = rate(r['fallbacks'], r.get('queries', 0))
  if r.get('fallback_list'):
    out['first_fallback'] = dict(r['fallback_list'][0])
  return out


def judge_counts(judged: dict) -> dict:
  """Per judge: its calls and failed calls over every comparison (report['judge'])."""
  out = {}
  for name, comparisons in judged.items():
    per = {}
    for comparison, result in comparisons.items():
      calls = 2 * result['num_queries']   # the order-consistent protocol: two calls a query
      per[comparison] = dict(calls=calls, failed_calls=result['failed_calls'],
                             rate=rate(result['failed_calls'], calls),
                             queries=result['num_queries'],
                             excluded_queries=result['failures'])
    total = {k: sum(c[k] for c in per.values())
             for k in ('calls', 'failed_calls', 'queries', 'excluded_queries')}
    total['rate'] = rate(total['failed_calls'], total['calls'])
    first = next((r['first_failure'] for r in comparisons.values() if r.get('first_failure')),
                 None)
    if first is not None:
      total['first_failure'] = first
    out[name] = {**total, 'comparisons': per}
  return out


def summarize(stages: dict, eval_rephrase: dict, eval_sections: dict, judged: dict) -> dict:
  """report['fallbacks']: stages (the earlier stages' summaries by name), eval_rephrase
  (the eval rephraser's RephraseTally.to_json), eval_sections (evaluator section -> the
  tally of its calls), judged (report['judge'])."""
  out = {}
  for stage, summary in stages.items():
    counts = stage_rephrase(summary)
    if counts is not None:
      out[stage] = {REPHRASE: counts}
  out['eval'] = {REPHRASE: {**eval_rephrase, 'sections': dict(eval_sections)},
                 JUDGE: judge_counts(judged)}
  return out


def degraded(fallbacks: dict, metrics: dict, judged: dict, findings: list,
             topk_name: str | None, summaries: dict) -> dict:
  """report['degraded']: which stages fell back and which numbers rest on it (module
  docstring). topk_name: the top-k section the judges compared (its rephrasings feed the
  'aligned vs PT+rephrase' comparisons); summaries: the earlier stages' summaries."""
  stages = {}
  for stage, entry in fallbacks.items():
    fell = [REPHRASE] if entry.get(REPHRASE, {}).get('fallbacks') else []
    if any(j['failed_calls'] for j in entry.get(JUDGE, {}).values()):
      fell.append(JUDGE)
    if fell:
      stages[stage] = fell
  sections = {name for name, s in fallbacks['eval'][REPHRASE]['sections'].items()
              if s['fallbacks']}
  marked_metrics = {REPHRASED_SYSTEM: {
      key: [REPHRASE] for key in metrics.get(REPHRASED_SYSTEM, {})
      if key.split('/', 1)[0] in sections}}
  marked_metrics = {s: m for s, m in marked_metrics.items() if m}
  marked_judge = {}
  for name, comparisons in judged.items():
    for comparison, result in comparisons.items():
      tags = []
      if comparison.endswith(REPHRASED_SYSTEM) and topk_name in sections:
        tags.append(REPHRASE)
      if result['failed_calls']:
        tags.append(JUDGE)
      if tags:
        marked_judge.setdefault(name, {})[comparison] = tags
  marked_findings = {}
  for f in findings:
    tags = sorted({t for system in f['values']
                   for t in marked_metrics.get(system, {}).get(f['metric'], ())}
                  | set(marked_judge.get(f.get('judge'), {}).get(f.get('comparison'), ())))
    if tags:
      marked_findings[f['finding']] = tags
  stage_numbers = {stage: {key: [REPHRASE] for key in summaries.get(stage, {})
                           if 'rephrased' in key}
                   for stage, fell in stages.items() if REPHRASE in fell and stage != 'eval'}
  return dict(any=bool(stages), stages=stages, metrics=marked_metrics, judge=marked_judge,
              findings=marked_findings, stage_numbers={s: k for s, k in stage_numbers.items()
                                                       if k})


def marker(tags) -> str:
  """' †' / ' ‡' / ' †‡' for a number's tags ('' for none)."""
  return (' ' + ''.join(MARKERS[t] for t in (REPHRASE, JUDGE) if t in tags)) if tags else ''


def _pct(r) -> str:
  return 'n/a' if r is None else f'{r:.3f}'


def markdown(report: dict) -> list[str]:
  """The report's 'LLM calls and fallbacks' section: a verdict line, one table row per stage
  and step, and what each marker means."""
  fallbacks, marks = report.get('fallbacks') or {}, report.get('degraded') or {}
  if not fallbacks:
    return []
  lines = ['## LLM calls and fallbacks', '']
  if marks.get('any'):
    lines.append(f"**Some results rest on fallbacks**: numbers marked {MARKERS[REPHRASE]} "
                 'rest on rephrasings that fell back to the original query, numbers marked '
                 f'{MARKERS[JUDGE]} on failed judge calls (counts below).')
  else:
    lines.append('No fallback: every rephrasing and every judge call succeeded.')
  lines += ['', '| stage | step | backend | asked | failed / fell back | rate | from cache |',
            '|---|---|---|---|---|---|---|']
  notes = []
  for stage, entry in fallbacks.items():
    r = entry.get(REPHRASE)
    if r is not None:
      backend = f"{r['backend']}:{r['model']}, {r['style']}" if r.get('model') else r['backend']
      rows = [('rephrase', r)] + [(f'rephrase ({section})', s)
                                  for section, s in r.get('sections', {}).items()]
      for step, s in rows:
        lines.append(f"| {stage} | {step} | {backend} | {s['queries']} | {s['fallbacks']} | "
                     f"{_pct(s['rate'])} | {s['from_cache']} |")
      if r['fallbacks']:
        first = r.get('first_fallback') or {}
        what = ('the mined D_po (so the aligned model) used the original query for these'
                if stage == 'mine' else
                f'{REPHRASED_SYSTEM} searched with the original query there: its numbers '
                f"marked {MARKERS[REPHRASE]} are PT's where every rephrasing fell back")
        notes.append(f"- {MARKERS[REPHRASE]} {stage}: {r['fallbacks']} of {r['queries']} "
                     f"rephrasings fell back to the original query (rate {_pct(r['rate'])}); "
                     f"{what}. First: {first.get('query')!r} ({first.get('reason', '')})")
    for name, j in entry.get(JUDGE, {}).items():
      for comparison, c in j['comparisons'].items():
        lines.append(f"| {stage} | judge {name}: {comparison} | {name} | {c['calls']} calls | "
                     f"{c['failed_calls']} | {_pct(c['rate'])} | |")
      if j['failed_calls']:
        first = j.get('first_failure') or {}
        notes.append(f"- {MARKERS[JUDGE]} {stage}: judge {name}: {j['failed_calls']} of "
                     f"{j['calls']} calls failed (rate {_pct(j['rate'])}), "
                     f"{j['excluded_queries']} of {j['queries']} queries excluded from its "
                     f"rates. First: {first.get('query')!r} ({first.get('reason', '')})")
  return lines + ([''] + notes if notes else [])
