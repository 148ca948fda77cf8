"""A contrastive train step (forward + backward + AdamW), ours (JAX) vs open_clip (PyTorch):
same architecture, same weights, same batch, same loss, timed in alternation in one run,
together with an fp32 matmul whose throughput is the machine's practical peak (MFU).

  python -m benchmarks.open_clip_speed [--preset vit_b32] [--batch 8] [--quick]

open_clip's model is built from its config with random weights (create_model(...,
pretrained=None); no download), then given our initial weights, so that the two steps start
from the same function: the first step's losses must agree (checked, else an error). Their
step is open_clip's training loop (training/train.py) without data loading: zero_grad,
forward, ClipLoss, backward, global-norm clipping, AdamW (their parameter groups: no decay on
gains, biases, logit scale), and the logit-scale clamp. Ours is train.make_train_step with
label smoothing off (ClipLoss has none). torch's step is timed on every core and on one
thread; the faster counts (benchmarks/torch_threads.py: on a loaded machine one thread can
win).

open_clip: `pip install --no-deps open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth` next to the CPU
torch (its other needs, regex, tqdm, huggingface_hub and safetensors, come with transformers).
Not with its dependencies: they bring torchvision, whose PyPI build is for CUDA torch, and
importing that next to a CPU torch fails, breaking transformers' CLIPModel too. Without
torchvision, open_clip imports through a stand-in (`import_open_clip`); the model and loss
used here never touch it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
import types

import jax
import numpy as np

from aesalign_jax import train
from aesalign_jax.models import clip
from benchmarks import steps, timing, torch_threads


def import_open_clip():
  """open_clip, or ImportError saying why not.

  open_clip imports torchvision (image transforms, FrozenBatchNorm2d) that its CLIP model and
  loss never use. Where torchvision is not installed, a stand-in serves those imports and is
  removed from sys.modules right after (transformers, imported later, must not see it).
  Where torchvision's compiled ops were built for another torch (a CUDA torchvision next to a
  CPU torch), its import fails on an operator it registers without checking; the two such
  operators are declared and the import retried.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError(f'torch is not installed ({e})') from e
  try:
    import open_clip  # pylint: disable=g-import-not-at-top
    return open_clip
  except ModuleNotFoundError as e:
    if e.name != 'torchvision':
      raise ImportError(f'open_clip is not installed: pip install --no-deps '
                        f'open-clip-torch==3.3.0 ftfy ({e})') from e
    _forget('open_clip')
    try:   # transformers (open_clip imports it) must find no torchvision: check, cached, now
      from transformers.utils import import_utils  # pylint: disable=g-import-not-at-top
      import_utils.is_torchvision_available()
    except ImportError:
      pass
    with _torchvision_stand_in():
      import open_clip  # pylint: disable=g-import-not-at-top,reimported
    import_open_clip.torchvision = 'stand-in (torchvision not installed)'
    return open_clip
  except RuntimeError as e:
    if 'torchvision::' not in str(e):
      raise
  _forget('torchvision', 'open_clip', 'timm')
  lib = torch.library.Library('torchvision', 'FRAGMENT')
  for op in ('nms', 'qnms'):
    lib.define(f'{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  import_open_clip.torchvision_ops_library = lib   # keep the definitions alive
  import open_clip  # pylint: disable=g-import-not-at-top,reimported
  return open_clip


def _forget(*packages: str) -> None:
  """Drops partly imported packages from sys.modules so that they import afresh."""
  for name in [m for m in sys.modules if m.split('.')[0] in packages]:
    del sys.modules[name]


class _Unusable(type):
  """A class standing for a torchvision name: attributes (InterpolationMode.BICUBIC) are
  strings, instances cannot be made."""

  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return f'{cls.__name__}.{name}'


class _StandInModule(types.ModuleType):

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)

    def refuse(*args, **kwargs):
      raise RuntimeError(f'{self.__name__}.{name}: torchvision is not installed (a stand-in '
                         'served the import of open_clip)')

    return _Unusable(name, (), {'__init__': refuse, '__call__': refuse})


@contextlib.contextmanager
def _torchvision_stand_in():
  names = ('torchvision', 'torchvision.transforms', 'torchvision.transforms.functional',
           'torchvision.ops', 'torchvision.ops.misc')
  modules = {name: _StandInModule(name) for name in names}
  for name, module in modules.items():
    parent, _, child = name.rpartition('.')
    if parent:
      setattr(modules[parent], child, module)
  sys.modules.update(modules)
  try:
    yield
  finally:
    for name in names:
      sys.modules.pop(name, None)


def open_clip_config(cfg: clip.ClipConfig) -> dict:
  """open_clip's model config (embed_dim, vision_cfg, text_cfg) for our ClipConfig."""
  return {
      'embed_dim': cfg.embed_dim,
      'vision_cfg': {'image_size': cfg.image_size, 'layers': cfg.vision_layers,
                     'width': cfg.vision_width, 'patch_size': cfg.patch_size,
                     'head_width': cfg.vision_width // cfg.vision_heads,
                     'mlp_ratio': cfg.vision_mlp / cfg.vision_width},
      'text_cfg': {'context_length': cfg.context_length, 'vocab_size': cfg.vocab_size,
                   'width': cfg.text_width, 'heads': cfg.text_heads,
                   'layers': cfg.text_layers, 'mlp_ratio': cfg.text_mlp / cfg.text_width},
  }


def create_model(open_clip, cfg: clip.ClipConfig):
  """open_clip's CLIP with our shapes, randomly initialised (no download), fp32, train mode.

  Built through create_model('ViT-B-32-quickgelu') with our shapes as overrides: for the
  vit_b32 preset they are that config's own (OpenAI's ViT-B/32, QuickGELU as our preset).
  """
  if cfg.vision_act != 'quick_gelu' or cfg.text_act != 'quick_gelu':
    raise ValueError('open_clip comparison: the preset must use quick_gelu in both towers')
  if cfg.eos_token_id != cfg.vocab_size - 1:
    raise ValueError('open_clip pools text at the highest token id: eos_token_id must be '
                     f'vocab_size - 1, got {cfg.eos_token_id} of {cfg.vocab_size}')
  logging.disable(logging.WARNING)   # 'No pretrained weights loaded': none were asked for
  try:
    model = open_clip.create_model('ViT-B-32-quickgelu', pretrained=None,
                                   **open_clip_config(cfg))
  finally:
    logging.disable(logging.NOTSET)
  return model.train()


def _t(x):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.array(x, np.float32))   # a copy, 0-d arrays kept 0-d


def _tower_state(prefix: str, tower: dict, layers: int) -> dict:
  out = {}
  for i in range(layers):
    b = tower['transformer']['blocks'][i]
    p = f'{prefix}transformer.resblocks.{i}.'
    a = b['attn']
    out[p + 'attn.in_proj_weight'] = np.concatenate(
        [np.asarray(a[n]['kernel']).T for n in ('q', 'k', 'v')])
    out[p + 'attn.in_proj_bias'] = np.concatenate([np.asarray(a[n]['bias'])
                                                   for n in ('q', 'k', 'v')])
    out[p + 'attn.out_proj.weight'] = np.asarray(a['out']['kernel']).T
    out[p + 'attn.out_proj.bias'] = a['out']['bias']
    for ours, theirs in (('ln1', 'ln_1'), ('ln2', 'ln_2')):
      out[p + theirs + '.weight'] = b[ours]['scale']
      out[p + theirs + '.bias'] = b[ours]['bias']
    out[p + 'mlp.c_fc.weight'] = np.asarray(b['fc1']['kernel']).T
    out[p + 'mlp.c_fc.bias'] = b['fc1']['bias']
    out[p + 'mlp.c_proj.weight'] = np.asarray(b['fc2']['kernel']).T
    out[p + 'mlp.c_proj.bias'] = b['fc2']['bias']
  return out


def state_dict_from_ours(cfg: clip.ClipConfig, params: dict) -> dict:
  """Our parameter tree as an open_clip CLIP state dict (numpy arrays)."""
  params = jax.device_get(params)
  v, t = params['vision'], params['text']
  out = {
      'visual.conv1.weight': np.asarray(v['patch_embed']).transpose(3, 2, 0, 1),
      'visual.class_embedding': v['class_embedding'],
      'visual.positional_embedding': v['pos_embedding'],
      'visual.ln_pre.weight': v['pre_ln']['scale'], 'visual.ln_pre.bias': v['pre_ln']['bias'],
      'visual.ln_post.weight': v['post_ln']['scale'],
      'visual.ln_post.bias': v['post_ln']['bias'],
      'visual.proj': v['proj']['kernel'],
      'token_embedding.weight': t['token_embedding'],
      'positional_embedding': t['pos_embedding'],
      'ln_final.weight': t['final_ln']['scale'], 'ln_final.bias': t['final_ln']['bias'],
      'text_projection': t['proj']['kernel'],
      'logit_scale': params['logit_scale'],
  }
  out.update(_tower_state('visual.', v, cfg.vision_layers))
  out.update(_tower_state('', t, cfg.text_layers))
  return out


def load_ours(model, cfg: clip.ClipConfig, params: dict) -> None:
  """Copies our parameters into the open_clip model; every one of its tensors is set."""
  import torch  # pylint: disable=g-import-not-at-top
  ours = state_dict_from_ours(cfg, params)
  theirs = model.state_dict()
  if set(ours) != set(theirs):
    only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    raise ValueError(f'open_clip parameter names differ: only ours {only_ours}, only theirs '
                     f'{only_theirs}')
  with torch.no_grad():
    for name, value in ours.items():
      target = theirs[name]
      if tuple(target.shape) != np.shape(value):
        raise ValueError(f'open_clip {name}: shape {tuple(target.shape)}, ours {np.shape(value)}')
      target.copy_(_t(value))


class OpenClipStep:
  """open_clip's training step on a fixed batch (see the module docstring)."""

  def __init__(self, open_clip, model, pixels_nchw, ids, *, lr=5e-4, weight_decay=0.1,
               grad_clip_norm=1.0, bf16_autocast=False):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.model = torch, model
    # open_clip's `--precision amp_bf16` on CPU: forward and loss under bf16 autocast
    # (matmuls in bf16 on oneDNN: AMX or AVX512-BF16 where the CPU has them), weights and
    # optimizer in fp32.
    self.autocast = ((lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if bf16_autocast
                     else contextlib.nullcontext)
    self.images, self.texts = pixels_nchw, ids
    self.loss_fn = open_clip.ClipLoss()
    # open_clip's training/main.py: no weight decay on gains, biases and the logit scale.
    exclude = lambda n, p: (p.ndim < 2 or 'bn' in n or 'ln' in n or 'bias' in n
                            or 'logit_scale' in n)
    named = list(model.named_parameters())
    self.optimizer = torch.optim.AdamW(
        [{'params': [p for n, p in named if exclude(n, p) and p.requires_grad],
          'weight_decay': 0.0},
         {'params': [p for n, p in named if not exclude(n, p) and p.requires_grad],
          'weight_decay': weight_decay}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6)
    self.grad_clip_norm = grad_clip_norm

  def loss(self) -> float:
    """The loss at the current weights, without a step."""
    with self.torch.no_grad(), self.autocast():
      img, txt, scale = self.model(self.images, self.texts)[:3]
      return float(self.loss_fn(img, txt, scale))

  def __call__(self):
    self.optimizer.zero_grad(set_to_none=True)
    with self.autocast():
      img, txt, scale = self.model(self.images, self.texts)[:3]
      loss = self.loss_fn(img, txt, scale)
    loss.backward()
    if self.grad_clip_norm:
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
    self.optimizer.step()
    with self.torch.no_grad():
      self.model.logit_scale.clamp_(0, math.log(100))
    return None


def compare(cfg: clip.ClipConfig, batch: int, *, repeats: int = 5, warmup: int = 1,
            max_seconds: float | None = None, matmul_n: int = 2048,
            with_open_clip: bool = True, loss_rtol: float = 2e-4, bf16: bool = False,
            bf16_loss_rtol: float = 3e-2) -> dict:
  """Times our train step, open_clip's (unless unavailable or with_open_clip=False) and an
  fp32 matmul in alternation. Returns seconds, GFLOP/s, MFU, both first losses; the key
  'open_clip_skipped' says why open_clip was not timed.

  bf16: also times, in the same rounds, our step with model.dtype=bfloat16 and open_clip's
  under bf16 autocast (its best CPU setting), each from the same initial weights; their
  first losses must agree within bf16_loss_rtol (bf16 rounds to 3 significant digits).
  Keys 'bf16': {ours_s, open_clip_s, losses, ratios}."""
  c = train.default_config('pretrain')
  c.label_smoothing = 0.0     # ClipLoss has no label smoothing
  c.batch_size = batch
  pairs = steps.random_pairs(cfg, batch)
  params = clip.init_params(cfg, 0)
  fns, row = {}, {'preset_shapes': open_clip_config(cfg), 'batch': batch}
  theirs = None
  if with_open_clip:
    try:
      open_clip = import_open_clip()
      import torch  # pylint: disable=g-import-not-at-top
      model = create_model(open_clip, cfg)
      load_ours(model, cfg, params)
      pixels = (pairs['image'].astype(np.float32) - train.IMAGE_MEAN) / train.IMAGE_STD
      theirs = OpenClipStep(open_clip, model, _t(pixels.transpose(0, 3, 1, 2)),
                            torch.from_numpy(pairs['ids'].astype(np.int64)))
      if bf16:
        model16 = create_model(open_clip, cfg)
        load_ours(model16, cfg, params)
        theirs16 = OpenClipStep(open_clip, model16, theirs.images, theirs.texts,
                                bf16_autocast=True)
      row.update(open_clip_version=open_clip.__version__, torch_version=torch.__version__,
                 torchvision=getattr(import_open_clip, 'torchvision', None) or _version(
                     'torchvision'),
                 open_clip_named_config_matches=(
                     open_clip_config(cfg) == named_config(open_clip, 'ViT-B-32')))
    except ImportError as e:
      row['open_clip_skipped'] = str(e)
  else:
    row['open_clip_skipped'] = 'not asked for'
  own = lambda: jax.tree.map(jax.numpy.copy, params)   # each step donates its own copy
  ours = steps.TrainStep(cfg, c, 'pretrain', {'pairs': pairs}, params=own())
  row['compile_s'] = ours.compile_s
  fns['ours'] = ours
  if bf16:
    fns['ours_bf16'] = ours16 = steps.TrainStep(dataclasses.replace(cfg, dtype='bfloat16'), c,
                                                'pretrain', {'pairs': pairs}, params=own())
  if theirs is not None:
    row['loss_open_clip'] = theirs.loss()
    fns.update(torch_threads.variants('open_clip', theirs))
    if bf16:
      loss_open_clip_bf16 = theirs16.loss()   # before its first step, as loss_open_clip
      fns.update(torch_threads.variants('open_clip_bf16', theirs16))
  peak = steps.Matmul(matmul_n)
  fns['matmul'] = peak
  if theirs is not None:
    threads = theirs.torch.get_num_threads()   # restored after the timing
  try:
    # The first (warm-up) step of each runs at the shared initial weights: its loss is the
    # same function evaluated twice.
    times = timing.interleaved_times(fns, warmup=0, repeats=1)
    row['loss_ours'] = ours.loss
    if theirs is not None:
      diff = abs(row['loss_ours'] - row['loss_open_clip'])
      if diff > loss_rtol * max(1.0, abs(row['loss_ours'])):
        raise AssertionError(f"ours and open_clip compute different losses at the same "
                             f"weights: {row['loss_ours']:.6f} vs {row['loss_open_clip']:.6f}")
      if bf16:
        pair = (ours16.loss, loss_open_clip_bf16)
        if abs(pair[0] - pair[1]) > bf16_loss_rtol * max(1.0, abs(pair[0])):
          raise AssertionError(f'ours and open_clip in bf16 compute different losses at the '
                               f'same weights: {pair[0]:.6f} vs {pair[1]:.6f}')
    times = timing.interleaved_times(fns, warmup=max(warmup - 1, 0), repeats=repeats,
                                     max_seconds=max_seconds)
  finally:
    if theirs is not None:
      theirs.torch.set_num_threads(threads)
  med = {name: float(np.median(t)) for name, t in times.items()}
  if theirs is not None:
    row.update(torch_threads.fastest('open_clip', times))
    med['open_clip'] = row['open_clip_s']
  peak_gflops = peak.flops / med['matmul'] / 1e9
  row.update(
      ours_s=med['ours'], matmul_n=matmul_n, matmul_peak_gflops=peak_gflops,
      flops_per_step=ours.flops, ours_gflops=ours.flops / med['ours'] / 1e9,
      ours_mfu=ours.flops / med['ours'] / 1e9 / peak_gflops,
      timings={name: timing.spread(t) for name, t in times.items()})
  if theirs is not None:
    row.update(open_clip_over_ours=med['open_clip'] / med['ours'],
               open_clip_mfu=ours.flops / med['open_clip'] / 1e9 / peak_gflops)
  if bf16:
    b = {'ours_s': med['ours_bf16'], 'ours_f32_over_ours_bf16': med['ours'] / med['ours_bf16'],
         'loss_ours': ours16.loss}
    if theirs is not None:
      fast = torch_threads.fastest('open_clip_bf16', times)
      b.update(open_clip_s=fast['open_clip_bf16_s'], torch_threads=fast['torch_threads'],
               open_clip_s_by_threads=fast['torch_s_by_threads'],
               loss_open_clip=loss_open_clip_bf16,
               open_clip_over_ours=fast['open_clip_bf16_s'] / med['ours_bf16'],
               open_clip_f32_over_bf16=med['open_clip'] / fast['open_clip_bf16_s'])
    row['bf16'] = b
  return row


def _version(module: str):
  try:
    return __import__(module).__version__
  except ImportError:
    return None


def named_config(open_clip, name: str) -> dict:
  """open_clip's named config in our mapping's keys (defaults filled in)."""
  c = open_clip.get_model_config(name)
  v, t = dict(c['vision_cfg']), dict(c['text_cfg'])
  v.setdefault('head_width', 64)
  v.setdefault('mlp_ratio', 4.0)
  t.setdefault('mlp_ratio', 4.0)
  return {'embed_dim': c['embed_dim'], 'vision_cfg': v, 'text_cfg': t}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--preset', default='vit_b32')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--quick', action='store_true', help='a 1-layer tiny model, 2 repeats')
  args = parser.parse_args()
  if args.quick:
    cfg, repeats = clip.preset('tiny', vision_layers=1, text_layers=1), 2
  else:
    cfg, repeats = clip.preset(args.preset), args.repeats
  start = time.perf_counter()
  r = compare(cfg, args.batch, repeats=repeats)
  line = (f"train step batch {args.batch}: ours {r['ours_s']:.3f} s "
          f"({100 * r['ours_mfu']:.0f}% of the {r['matmul_peak_gflops']:.0f} GFLOP/s matmul)")
  if 'open_clip_s' in r:
    line += (f", open_clip {r['open_clip_s']:.3f} s: ratio open_clip/ours "
             f"{r['open_clip_over_ours']:.2f} (losses {r['loss_ours']:.5f} vs "
             f"{r['loss_open_clip']:.5f})")
  else:
    line += f"; open_clip skipped: {r['open_clip_skipped']}"
  print(line + f' [{time.perf_counter() - start:.0f} s]')
  print(json.dumps(r))


if __name__ == '__main__':
  main()
