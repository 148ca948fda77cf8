"""Forward + backward of the CLIP contrastive loss: ours (JAX) vs transformers' PyTorch
CLIPModel, same shapes, same inputs, same machine, timed in alternation in one run.

  python -m benchmarks.model_speed [--quick]

Prints seconds per step and the ratio torch_time / our_time (> 1: ours is faster). torch's
step is timed on every core and on one thread; the faster counts (benchmarks/torch_threads.py).
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from aesalign_jax import losses
from aesalign_jax.models import clip, hf
from benchmarks import torch_threads
from benchmarks.timing import interleaved_times


def _torch_step(model, pixels, ids, mask):
  model.zero_grad(set_to_none=True)
  out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True)
  out.loss.backward()
  return out.loss


def compare(preset: str, batch: int, repeats: int, **overrides) -> dict:
  """overrides: ClipConfig fields changed from the preset (e.g. vision_layers=1)."""
  import torch
  import transformers
  cfg = clip.preset(preset, **overrides)
  params = clip.init_params(cfg)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  ids = rng.integers(0, cfg.vocab_size - 1, size=(batch, cfg.context_length))
  ids[:, -1] = cfg.eos_token_id
  eos = np.full((batch,), cfg.context_length - 1, np.int32)

  def loss_fn(p, x, t, e):
    img, txt, scale = clip.bind(cfg, p)(x, t, e)
    return losses.clip_infonce(img, txt, scale)[0]

  step = jax.jit(jax.value_and_grad(loss_fn))
  jx = (jnp.asarray(pixels), jnp.asarray(ids, jnp.int32), jnp.asarray(eos))
  ours = lambda: jax.block_until_ready(step(params, *jx))

  import tempfile
  with tempfile.TemporaryDirectory() as folder:
    hf.save_hf_folder(cfg, params, folder)
    model = transformers.CLIPModel.from_pretrained(folder).train()
  tx = (torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), torch.from_numpy(ids),
        torch.ones(ids.shape, dtype=torch.long))
  theirs = lambda: _torch_step(model, tx[0], tx[1], tx[2])
  # Same loss value: the two implementations compute the same function.
  ours_loss = float(step(params, *jx)[0])
  theirs_loss = float(theirs().detach())
  threads = torch.get_num_threads()
  try:
    times = interleaved_times({'ours': ours, **torch_threads.variants('torch', theirs)},
                              warmup=2, repeats=repeats)
  finally:
    torch.set_num_threads(threads)
  t = {'ours': float(np.median(times['ours'])), **torch_threads.fastest('torch', times)}
  return {'preset': preset, 'overrides': overrides, 'batch': batch, 'ours_s': t['ours'],
          'torch_s': t['torch_s'], 'torch_over_ours': t['torch_s'] / t['ours'],
          'loss_ours': ours_loss, 'loss_torch': theirs_loss,
          'torch_threads': t['torch_threads'], 'torch_s_by_threads': t['torch_s_by_threads']}


def run(quick: bool = False) -> dict:
  rows = [compare('tiny', 8, 5 if quick else 20)]
  rows.append(compare('vit_b32', 8, 2 if quick else 5))
  return {'model_fwd_bwd_vs_transformers': rows}


if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true')
  result = run(parser.parse_args().quick)
  for row in result['model_fwd_bwd_vs_transformers']:
    print(f"{row['preset']:8s} batch {row['batch']}: ours {row['ours_s']*1e3:8.1f} ms, "
          f"transformers {row['torch_s']*1e3:8.1f} ms, ratio torch/ours "
          f"{row['torch_over_ours']:.2f} (losses {row['loss_ours']:.4f} vs "
          f"{row['loss_torch']:.4f})")
  print(json.dumps(result))
