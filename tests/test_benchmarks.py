"""The benchmark suite runs end to end at a tiny size and writes a complete results table.

Timings at this size mean nothing; what must hold is that every row is measured (finite,
positive) or says why it was skipped, that the files are written, and that the comparisons
compare the same function (open_clip's loss equals ours at the same weights).
"""

import json
import math
import os

import pytest

from aesalign_jax.models import clip

from benchmarks import gpu_step, gpu_trace, run_all   # from the checkout (pytest's pythonpath)


@pytest.fixture(scope='module')
def quick_results(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'results.json'
  assert run_all.main(['--quick', '--out', str(out)]) == 0   # 1: some row errored
  with open(out, encoding='utf-8') as f:
    return json.load(f), out


def test_quick_run_writes_every_row_measured_or_skipped(quick_results):
  result, _ = quick_results
  names = [r['name'] for r in result['rows']]
  assert len(names) == len(set(names))
  for prefix in run_all.ORDER:   # every benchmark of the suite has its row
    assert any(n.startswith(prefix) for n in names), prefix
  for r in result['rows']:
    if r['status'] != 'ok':
      assert r['status'].startswith('skipped: '), (r['name'], r['status'])
      continue
    for side in ('a', 'b'):
      assert math.isfinite(r[side]['value']) and r[side]['value'] > 0, r
      assert r[side]['unit'] and r[side]['label']
    assert math.isfinite(r['ratio']) and r['ratio'] > 0, r
    assert r['ratio_is'] and r['compared'] and isinstance(r['settings'], dict)
    assert r['machine']['cpu_count'] >= 1 and r['machine']['jax'] and r['machine']['backend']
    if 'target' in r:
      assert r['meets_target'] == (r['ratio'] >= float(r['target'].split()[-1]))


def test_quick_run_writes_the_markdown_table_beside_the_json(quick_results):
  result, out = quick_results
  md = out.with_suffix('.md').read_text(encoding='utf-8')
  assert md == run_all.markdown(result)
  table = [line for line in md.splitlines() if line.startswith('| ')]
  assert len(table) == 2 + len(result['rows'])   # header, rule, one line per row
  for r in result['rows']:
    assert f"| {r['name']} |" in md


def test_ratios_are_the_quotients_of_their_measurements(quick_results):
  rows = {r['name']: r for r in quick_results[0]['rows'] if r['status'] == 'ok'}
  dpo = rows['dpo_listwise_vs_pairwise']
  assert dpo['ratio'] == pytest.approx(dpo['a']['value'] / dpo['b']['value'], rel=1e-6)
  pipe = rows['pairs_pipeline_vs_pretrain_step']
  assert pipe['ratio'] == pytest.approx(pipe['a']['value'] / pipe['b']['value'], rel=1e-6)
  for r in rows.values():
    if r['ratio_is'].startswith('MFU'):
      assert r['ratio'] == pytest.approx(r['a']['value'] / r['b']['value'], rel=1e-6)
    if '(> 1: ours faster)' in r['ratio_is']:   # theirs s / ours s
      assert r['ratio'] == pytest.approx(r['b']['value'] / r['a']['value'], rel=1e-6)


def test_open_clip_step_computes_our_loss_at_the_same_weights(quick_results):
  rows = {r['name']: r for r in quick_results[0]['rows']}
  r = rows['train_step_vs_open_clip']
  if r['status'] != 'ok':
    pytest.skip(r['status'])
  d = r['details']
  assert d['loss_ours'] == pytest.approx(d['loss_open_clip'], rel=1e-5)
  assert d['loss_ours'] == pytest.approx(math.log(8), rel=0.2)   # random init: near log(B)


def test_open_clip_shapes_of_vit_b32_are_its_named_config():
  from benchmarks import open_clip_speed
  try:
    open_clip = open_clip_speed.import_open_clip()
  except ImportError as e:
    pytest.skip(str(e))
  assert (open_clip_speed.open_clip_config(clip.preset('vit_b32'))
          == open_clip_speed.named_config(open_clip, 'ViT-B-32'))


def test_gpu_step_runs_at_a_tiny_size_on_cpu():
  cfg = clip.preset('tiny', vision_layers=1, text_layers=1)
  r = gpu_step.run(cfg, [8, 4], steps=1, kinds=('align',))   # align: pairs and groups
  assert r['backend'] and r['matmul_peak_tflops'] > 0
  assert r['align']['batch'] == 8                  # the largest batch fits on the host
  assert r['align']['groups'] == 1
  assert math.isfinite(r['align']['loss']) and 0 < r['align']['mfu'] < 2
  assert 'pretrain' not in r and 'dpo_listwise_vs_pairwise' not in r   # only the kinds asked


def test_gpu_step_plan_runs_at_a_tiny_size_on_cpu(tmp_path):
  """The GPU script's plan machinery at the tiny preset: a child per XLA_FLAGS group (a bad
  flag recorded, the next group still run), the largest-batch fit, remat at 2x the best
  batch, the profile's top kernels parsed from the perfetto trace, the loss timed alone,
  JSON and Markdown written."""
  out = tmp_path / 'results_gpu.json'
  r = gpu_step.run_plan('tiny', str(out), trace_dir=str(tmp_path / 'trace'), cache_dir='',
                        log=lambda *a: None)
  assert json.loads(out.read_text(encoding='utf-8')) == json.loads(json.dumps(r, default=str))
  assert (tmp_path / 'results_gpu.md').read_text(encoding='utf-8') == gpu_step.markdown(r)
  assert r['finished'] and r['elapsed_s'] < r['budget_s']
  v = {x['name']: x for x in r['variants']}
  bad = v['tiny_pretrain_bad_flag']   # its group ran first and its child died at start
  assert bad['status'].startswith('not run') and 'Unknown flag' in bad['status'], bad
  assert [g['name'] for g in r['groups']] == ['bad_flag', 'base']
  assert r['groups'][0]['rc'] != 0 and r['groups'][1]['status'] == 'ok'
  # The base child saw its group's XLA_FLAGS (read back from inside the child).
  assert '--xla_backend_optimization_level=0' in r['devices'][0]['xla_flags']
  a, b = v['tiny_pretrain_einsum'], v['tiny_pretrain_remat_2x']
  assert a['status'] == b['status'] == 'ok', (a['status'], b['status'])
  assert a['batch'] == 16 and not a['remat'] and a['fit']['tried'][0]['batch'] == 16
  assert b['batch'] == 2 * a['batch'] and b['remat'] and b['attention'] == 'einsum'
  for x in (a, b):
    assert x['step_s'] > 0 and math.isfinite(x['loss']) and x['temp_bytes'] >= 0
    assert x['mfu'] == pytest.approx(x['tflops_per_s'] / r['matmul_peak_tflops'])
  best = max((a, b), key=lambda x: x['tflops_per_s'])
  assert r['best']['tiny_pretrain']['name'] == best['name']
  p = v['tiny_profile']
  assert p['status'] == 'ok' and p['of'] == best['name'] and p['trace'].endswith('.json.gz')
  assert p['top'] and p['kernel_total_ms'] > 0 and 0 < sum(k['share'] for k in p['top']) <= 1
  assert all(gpu_trace.is_host_kernel(k['name']) for k in p['top'])
  loss = v['tiny_loss_bf16']
  assert loss['status'] == 'ok' and loss['batch'] == best['batch']
  assert all(s > 0 for s in loss['seconds'].values())
  assert loss['abs_diff_vs_fp32']['bf16_logits'] < 0.05 and loss['fp32_share_of_step'] > 0
  assert r['done_when']['profile_top_kernels'] and r['done_when']['best_variant'] == best['name']
  md = gpu_step.markdown(r)
  assert ('| tiny_pretrain_remat_2x | tiny | pretrain | 32 | on | einsum | '
          '`--xla_backend_optimization_level=0` |') in md
  assert 'Top kernels of' in md and 'Unknown flag' in md


def test_gpu_step_plan_out_of_time_still_writes_every_variant(tmp_path):
  """A budget that runs out: the running child is killed, nothing is left pending, and the
  JSON is complete."""
  out = tmp_path / 'r.json'
  r = gpu_step.run_plan('tiny', str(out), budget_s=4, trace_dir=str(tmp_path / 't'),
                        cache_dir='', log=lambda *a: None)
  assert json.loads(out.read_text(encoding='utf-8'))['finished']
  for x in r['variants']:
    assert x['status'] == 'ok' or x['status'].startswith(('skipped: ', 'not run: ')), x


def test_gpu_step_fit_batch_finds_the_largest_batch_that_fits():
  fixed, per, limit = 1000, 10, 6000   # need(b) = fixed + per * b (+ a fixed temp part)
  calls = []

  def compile_at(b):
    calls.append(b)
    return f'exe{b}', fixed + 200 + per * b

  b, exe, need, tried = gpu_step.fit_batch(compile_at, 1024, limit, fixed, step=64)
  assert (b, exe) == (448, 'exe448') and need <= limit and calls == [1024, 448]  # 512 > limit
  assert [t['fits'] for t in tried] == [False, True]
  calls.clear()
  b, *_ = gpu_step.fit_batch(compile_at, 64, limit, fixed, step=64)   # grows, then again
  assert b == 448 and calls == [64, 320, 448]
  calls.clear()
  assert gpu_step.fit_batch(compile_at, 64, limit, fixed, step=64, cap=128)[0] == 128
  assert gpu_step.fit_batch(compile_at, 4096, 1100, fixed, step=64)[0] is None   # none fits
  assert gpu_step.fit_batch(compile_at, 96, None, fixed, step=64)[0] == 96   # no limit known
  assert gpu_step.next_batch(512, 6320, fixed, limit, 64) == 448


def test_gpu_trace_reads_the_kernels_of_a_gpu_shaped_trace(tmp_path):
  import gzip
  ev = [{'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
        {'ph': 'M', 'pid': 1, 'tid': 1, 'name': 'thread_name', 'args': {'name': 'python'}},
        {'ph': 'M', 'pid': 2, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
        {'ph': 'M', 'pid': 2, 'tid': 7, 'name': 'thread_name',
         'args': {'name': 'Stream #7(Compute)'}},
        {'ph': 'M', 'pid': 2, 'tid': 9, 'name': 'thread_name', 'args': {'name': 'XLA Ops'}}]
  x = lambda pid, tid, name, ts, dur, **args: {'ph': 'X', 'pid': pid, 'tid': tid, 'name': name,
                                               'ts': ts, 'dur': dur, 'args': args}
  ev += [x(1, 1, 'PjitFunction(step)', 0, 1000), x(1, 1, 'ynn_fusion.1', 0, 999),
         x(2, 7, 'sm90_xmma_gemm_bf16bf16', 0, 60, hlo_op='dot.1'),
         x(2, 7, 'sm90_xmma_gemm_bf16bf16', 100, 20, hlo_op='dot.2'),
         x(2, 7, 'loop_multiply_fusion', 60, 15), x(2, 7, 'cudnn_fmha_fwd', 80, 5),
         x(2, 9, 'fusion.3', 0, 500)]
  path = tmp_path / 'perfetto_trace.json.gz'
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    json.dump({'traceEvents': ev}, f)
  assert gpu_trace.find_trace(str(tmp_path)) == str(path)
  t = gpu_trace.top_kernels(str(path), top=2, steps=2)
  assert [k['name'] for k in t['top']] == ['sm90_xmma_gemm_bf16bf16', 'loop_multiply_fusion']
  assert t['top'][0]['share'] == pytest.approx(0.8) and t['top'][0]['count'] == 2
  assert t['top'][0]['ms_per_step'] == pytest.approx(0.04) and t['top'][0]['category'] == 'gemm'
  assert t['top'][0]['hlo_ops'] == ['dot.1', 'dot.2']
  assert t['kernels'] == 3 and t['kernel_total_ms'] == pytest.approx(0.1)
  assert t['kernel_time_over_window'] == pytest.approx(100 / 120)
  assert t['category_shares']['attention'] == pytest.approx(0.05)
  assert t['xla_ops'][0]['name'] == 'fusion.3'
  assert not gpu_trace.is_host_kernel('ThunkExecutor::Execute')
  assert gpu_trace.is_host_kernel('ynn_fusion.136')


def test_gpu_step_full_plan_is_well_formed(tmp_path):
  """The GPU plan's groups, without a GPU: unique names, runnable action types, the flags
  each group sets, and its 'best' references resolved against earlier results."""
  trace = str(tmp_path)
  best = {'name': 'b16_pretrain_cudnn', 'type': 'step', 'status': 'ok', 'kind': 'pretrain',
          'preset': 'vit_b16', 'attention': 'cudnn', 'remat': False, 'batch': 1152,
          'tflops_per_s': 500.0}
  for b in (None, best):
    groups = [build(b, trace) for build in gpu_step.PLANS['full']['groups']]
    names = [a['name'] for g in groups for a in g['actions']]
    assert len(names) == len(set(names))
    assert all(callable(getattr(gpu_step.Child, a['type'])) for g in groups
               for a in g['actions'])
  by_name = {g['name']: g for g in groups}
  assert by_name['lhs']['xla_flags'] == '--xla_gpu_enable_latency_hiding_scheduler=true'
  assert by_name['no_triton_gemm']['xla_flags'] == '--xla_gpu_enable_triton_gemm=false'
  lhs = by_name['lhs']['actions'][0]
  assert (lhs['attention'], lhs['remat'], lhs['batch']) == ('cudnn', False, 1152)
  assert by_name['l14']['actions'][0]['batch']['cap'] == 1152   # ViT-L/14 at most that batch
  child = gpu_step.Child({'events': str(tmp_path / 'e.jsonl'), 'context': {'x': best}})
  base = {a['name']: a for a in by_name['base']['actions']}
  remat = child.resolve_step(base['b16_pretrain_remat_4x'])
  assert remat == {'attention': 'cudnn', 'remat': True, 'batch': 4608}
  assert child.resolve_step(base['b16_align']) == {'attention': 'cudnn', 'remat': False,
                                                   'batch': 576}
  assert child.resolve_step(base['b16_pretrain_fused_xla'])['batch']['fit']   # einsum not run
  assert gpu_step.nominal_peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert gpu_step.nominal_peak_tflops('NVIDIA H200') == 989.0
  assert gpu_step.nominal_peak_tflops('NVIDIA H100 PCIe') == 756.0
  assert gpu_step.nominal_peak_tflops('cpu') is None


def test_other_processes_cpu_time_is_measured_apart_from_ours():
  """A row is called quiet from the CPU time OTHER processes used while it ran: a process
  spinning beside us must show, our own spinning must not (each against a window in which
  we sleep, so the machine's background load cancels)."""
  import subprocess
  import sys
  import time

  def window(work) -> float:
    others = run_all.OthersCpu()
    work()
    return others.share() * os.cpu_count()   # in cores

  def spin(seconds=1.5):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
      pass

  idle = window(lambda: time.sleep(1.5))
  if idle > os.cpu_count() - 1.2:   # no free core left for the spinning process to show on
    pytest.skip(f'other processes already use {idle:.1f} of {os.cpu_count()} cores')
  ours = window(spin)
  busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
  try:
    time.sleep(0.3)
    beside = window(lambda: time.sleep(1.5))
  finally:
    busy.kill()
    busy.wait()
  assert beside - idle >= 0.4, (idle, ours, beside)   # about one core
  assert ours - idle <= 0.4, (idle, ours, beside)     # about zero
