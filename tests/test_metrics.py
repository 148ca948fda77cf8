"""Metric logging (console, JSONL, TensorBoard, resume, throughput) and analytic CLIP FLOPs."""

import io
import json
import os
import struct

import jax
import jax.numpy as jnp
import pytest

from aesalign_jax import metrics
from aesalign_jax.models import clip


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _metrics(step):
  return {'grad_norm': 2.0, 'loss': jnp.asarray(1.0 / step), 'rewards/chosen': jnp.asarray(0.5),
          'rewards/rejected': jnp.asarray(-0.25), 'rewards/margins': jnp.asarray(0.75),
          'rewards/accuracies': jnp.asarray(0.875), 'lr': 3e-4}


def _logger(workdir, clock=None, **kw):
  args = dict(total_steps=10, log_every=4, is_main_process=True, flops_per_step=2e12,
              peak_tflops_per_device=10.0, num_devices=2, progress_bar=False,
              stream=io.StringIO(), clock=clock or FakeClock())
  return metrics.MetricLogger(workdir, **{**args, **kw})


def _run(logger, clock, steps, *, compile_s=10.0, step_s=0.5, examples=64):
  records = []
  for step in steps:
    clock.now += compile_s if step == steps[0] else step_s
    r = logger.log_step(step, _metrics(step), examples=examples, data_wait_s=0.125)
    if r is not None:
      records.append(r)
  return records


def _read_events(path):
  """TensorBoard event records (length, crc, Event proto, crc) of one event file."""
  from tensorboardX.proto import event_pb2
  data, events, i = open(path, 'rb').read(), [], 0
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i:i + 8])
    events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return events


def _scalars(path, tag):
  return [(e.step, v.simple_value) for e in _read_events(path)
          for v in e.summary.value if v.tag == tag]


def _event_files(workdir):
  return sorted((os.path.join(workdir, f) for f in os.listdir(workdir)
                 if f.startswith('events.out.tfevents')), key=os.path.getmtime)


def _read_jsonl(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_console_line_names_losses_dpo_metrics_grad_norm_lr_and_throughput(tmp_path):
  clock = FakeClock()
  stream = io.StringIO()
  logger = _logger(tmp_path, clock, stream=stream)
  _run(logger, clock, range(1, 5))
  lines = stream.getvalue().splitlines()
  logger.close()
  assert len(lines) == 2   # the first step, then one per interval of 4
  first, line = lines
  assert first.startswith('step 1/10') and 'compile 10.0s' in first and 'ex/s' not in first
  for field in ('step 4/10', 'loss 0.3611', 'rewards/chosen 0.5', 'rewards/rejected -0.25',
                'rewards/margins 0.75', 'rewards/accuracies 0.875', 'grad_norm 2',
                'lr 3.00e-04', '0.5 s/step (data 0.12 s)', '128 ex/s', '4 TFLOP/s',
                'MFU 20.0%', 'eta 0m03s'):
    assert field in line, (field, line)
  # Losses first, then the DPO rewards, then the rest in the caller's order.
  order = [line.index(k) for k in ('loss', 'rewards/chosen', 'grad_norm', 'lr ')]
  assert order == sorted(order), line


def test_compile_steps_are_left_out_of_throughput(tmp_path):
  clock = FakeClock()
  logger = _logger(tmp_path, clock, compile_steps=1)
  first, second, *_ = _run(logger, clock, range(1, 11), compile_s=100.0, step_s=0.5)
  logger.close()
  assert first['time/compile_s'] == 100.0
  assert not [k for k in first if k.startswith('perf/') or k == 'time/step_s']
  # Steps 2..4: 3 steps of 0.5 s, 64 examples each, 2 TFLOP each, on 2 devices.
  assert second['time/step_s'] == 0.5
  assert second['perf/examples_per_s'] == 128.0
  assert second['perf/tflops_per_s'] == 4.0
  assert second['perf/tflops_per_s_per_device'] == 2.0
  assert second['perf/mfu'] == pytest.approx(0.2)
  assert 'time/compile_s' not in second
  # An explicitly flagged recompile is also excluded.
  clock.now += 50.0
  logger2 = _logger(tmp_path / 'b', clock, compile_steps=0)
  clock.now += 0.5
  logger2.log_step(1, {'loss': 1.0}, examples=64)
  for step, dt, compiling in ((2, 0.5, False), (3, 30.0, True), (4, 0.5, False)):
    clock.now += dt
    r = logger2.log_step(step, {'loss': 1.0}, examples=64, compiling=compiling)
  logger2.close()
  assert r['time/compile_s'] == 30.0 and r['perf/examples_per_s'] == 128.0


def test_metrics_are_averaged_over_the_interval(tmp_path):
  clock = FakeClock()
  logger = _logger(tmp_path, clock)
  records = _run(logger, clock, range(1, 9))
  logger.close()
  assert [r['step'] for r in records] == [1, 4, 8]
  assert records[1]['loss'] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
  assert records[2]['loss'] == pytest.approx((1 / 5 + 1 / 6 + 1 / 7 + 1 / 8) / 4)


def test_jsonl_and_tensorboard_files_are_written(tmp_path):
  clock = FakeClock()
  logger = _logger(tmp_path, clock)
  _run(logger, clock, range(1, 11))
  logger.write_scalars(10, {'r1': jnp.asarray(0.25)}, prefix='eval/')
  logger.close()
  rows = _read_jsonl(tmp_path)
  assert [r['step'] for r in rows] == [1, 4, 8, 10, 10]   # the last step is always logged
  assert rows[1]['rewards/accuracies'] == 0.875 and rows[1]['perf/examples_per_s'] == 128.0
  assert rows[-1] == {'step': 10, 'eval/r1': 0.25}
  (events,) = _event_files(tmp_path)
  assert os.path.getsize(events) > 200
  assert [s for s, _ in _scalars(events, 'rewards/margins')] == [1, 4, 8, 10]
  assert _scalars(events, 'perf/examples_per_s') == [(4, 128.0), (8, 128.0), (10, 128.0)]
  assert _scalars(events, 'eval/r1') == [(10, 0.25)]


def test_resume_drops_records_after_the_restored_step(tmp_path):
  clock = FakeClock()
  logger = _logger(tmp_path, clock)
  _run(logger, clock, range(1, 10))   # crashed after step 9; checkpoint at step 4
  logger.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 9, "lo')       # a line torn by the crash
  assert [r['step'] for r in _read_jsonl_lenient(tmp_path)] == [1, 4, 8]
  logger = _logger(tmp_path, clock, start_step=4)
  _run(logger, clock, range(5, 11))
  logger.close()
  # The uninterrupted run's records: the intervals after the restored step are the same steps.
  records = _read_jsonl(tmp_path)
  assert [r['step'] for r in records] == [1, 4, 8, 10]
  assert records[2]['loss'] == pytest.approx((1 / 5 + 1 / 6 + 1 / 7 + 1 / 8) / 4)
  # TensorBoard: the new event file tells TensorBoard to drop the old run's steps > 4.
  new_events = _event_files(tmp_path)[-1]
  assert [e.step for e in _read_events(new_events) if e.HasField('session_log')] == [5]
  assert [s for s, _ in _scalars(new_events, 'loss')] == [8, 10]


def _read_jsonl_lenient(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.endswith('}\n')]


def test_non_main_process_writes_nothing(tmp_path):
  clock = FakeClock()
  workdir = tmp_path / 'w'
  stream = io.StringIO()
  logger = _logger(workdir, clock, is_main_process=False, stream=stream)
  assert _run(logger, clock, range(1, 11)) == []
  logger.write_scalars(10, {'x': 1.0})
  logger.close()
  assert not workdir.exists() and stream.getvalue() == ''


def test_progress_bar_keeps_console_lines(tmp_path, capsys):
  clock = FakeClock()
  logger = _logger(tmp_path, clock, progress_bar=True, stream=None)
  _run(logger, clock, range(1, 5))
  logger.close()
  out, err = capsys.readouterr()
  assert 'step 4/10' in out and 'rewards/margins' in out
  assert '4/10' in err   # the bar, on stderr


# FLOPs.

def test_clip_flops_matches_a_hand_count():
  cfg = clip.ClipConfig(image_size=8, patch_size=4, vision_width=8, vision_layers=1,
                        vision_heads=2, vision_mlp=16, vocab_size=32, context_length=4,
                        text_width=4, text_layers=2, text_heads=1, text_mlp=8, embed_dim=2,
                        eos_token_id=31)
  # Image: 4 patches + class token = 5 tokens of width 8.
  patch = 4 * (3 * 16) * 8                                  # 1536
  block = 4 * 5 * 64 + 2 * 5 * 8 * 16 + 2 * 25 * 8         # 1280 + 1280 + 400
  image = patch + block + 8 * 2                             # 4512 MACs
  # Text: 4 tokens of width 4, 2 layers.
  text = 2 * (4 * 4 * 16 + 2 * 4 * 4 * 8 + 2 * 16 * 4) + 4 * 2   # 2 * 640 + 8 = 1288 MACs
  assert metrics.clip_flops(cfg, images=3, texts=5, backward=False) == 2 * (3 * image + 5 * text)
  assert metrics.clip_flops(cfg, images=3, texts=5) == 3 * 2 * (3 * image + 5 * text)
  assert metrics.clip_flops(cfg, images=0, texts=1, backward=False, text_length=2) == 2 * (
      2 * (4 * 2 * 16 + 2 * 2 * 4 * 8 + 2 * 4 * 4) + 8)


def test_clip_flops_agrees_with_xla_cost_analysis_for_tiny_preset():
  cfg = clip.preset('tiny')
  params = clip.abstract_params(cfg)
  images = jax.ShapeDtypeStruct((4, cfg.image_size, cfg.image_size, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((6, cfg.context_length), jnp.int32)
  eos = jax.ShapeDtypeStruct((6,), jnp.int32)
  forward = lambda p, x, t, e: clip.bind(cfg, p)(x, t, e)
  cost = jax.jit(forward).lower(params, images, ids, eos).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost   # older jax: a list
  analytic = metrics.clip_flops(cfg, images=4, texts=6, backward=False)
  # XLA also counts layer norms, softmax and activations: a few % more than the matmuls.
  assert 1.0 <= cost['flops'] / analytic < 1.1, (cost['flops'], analytic)
