"""SigLIP pretraining with its learned bias, and the conv-stem (hybrid) vision tower: both
live in the parameters, train, and survive the model folder."""

import json

import jax
import numpy as np
import pytest

from aesalign_jax import embed
from aesalign_jax.models import clip, hf
from aesalign_jax.train import objectives
from conftest import pretrain_on_world

STEPS, BATCH, EVAL = 120, 64, 256


@pytest.fixture(scope='module')
def siglip_run(tmp_path_factory):
  return pretrain_on_world(tmp_path_factory.mktemp('siglip'), layers=1, steps=STEPS,
                           batch=BATCH, warmup=20, loss='siglip', log_every=20, siglip=True)


def test_siglip_starts_from_the_papers_scale_and_bias():
  cfg, _ = clip.with_siglip_bias(clip.preset('tiny'))
  params = clip.init_params(cfg)
  assert float(params['logit_bias']) == -10.0
  assert float(np.exp(params['logit_scale'])) == pytest.approx(10.0)
  # A trained CLIP keeps its scale and gains the bias.
  trained = clip.init_params(clip.preset('tiny'))
  cfg2, with_bias = clip.with_siglip_bias(clip.preset('tiny'), trained)
  assert float(with_bias['logit_bias']) == -10.0
  assert float(with_bias['logit_scale']) == float(trained['logit_scale'])
  assert jax.tree.structure(with_bias) == jax.tree.structure(clip.init_params(cfg2))


def test_siglip_pretraining_learns_the_world_and_trains_its_bias(siglip_run):
  losses = [h['loss'] for h in siglip_run['result'].history]
  # Measured: 9.33 at step 1 -> 3.90 at step 120 (batch 64, 1-layer towers).
  assert losses[-1] < 0.6 * losses[0], losses
  bias = float(siglip_run['params']['logit_bias'])
  # Measured: -10 -> -9.9946. Adam moves a scalar by at most about lr per step, so 120 steps
  # at lr <= 1e-3 move it by < 0.12; a constant bias (as before: params.get(.., -10.0)) by 0.
  assert 1e-3 < abs(bias + 10.0) < 0.12, bias
  world, tok, cfg = siglip_run['world'], siglip_run['tok'], siglip_run['cfg']
  idx = world.split_indices('eval')[:EVAL]
  embedder = embed.Embedder(cfg, siglip_run['params'], tok)
  img = embedder.images(world.render_batch(idx))
  txt = embedder.texts(world.captions(idx))
  top1 = float(np.mean(np.argmax(img @ txt.T, 1) == np.arange(EVAL)))
  # Measured: 0.047 (chance 1/256 = 0.004): colour, size and pattern already rank captions.
  assert top1 > 5.0 / EVAL, top1


def test_siglip_bias_survives_the_model_folder(siglip_run, tmp_path):
  cfg, params = siglip_run['cfg'], siglip_run['params']
  hf.save_hf_folder(cfg, params, str(tmp_path))
  saved = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
  assert saved['logit_bias_init_value'] == -10.0
  cfg2, params2 = hf.load_hf_folder(str(tmp_path))
  assert cfg2 == cfg
  assert float(params2['logit_bias']) == float(params['logit_bias'])


def test_siglip_refuses_a_model_without_a_bias():
  cfg = clip.preset('tiny', vision_layers=1, text_layers=1)
  batch = next(iter(_pairs(cfg)))
  with pytest.raises(ValueError, match='logit bias'):
    objectives.contrastive_loss(cfg, clip.init_params(cfg), batch, kind='siglip',
                                label_smoothing=0.0)


def _pairs(cfg):
  import synthetic_batches
  return synthetic_batches.pairs_iterator(cfg, 4, seed=0)


def test_conv_stem_round_trips_the_model_folder_and_changes_only_the_stem(tmp_path):
  patch = clip.preset('tiny')
  conv = clip.preset('tiny', vision_stem='conv')
  assert conv.stem_channels == (32, 64, 128)   # 32 -> 16 -> 8 -> 4 px: patch 8's 4x4 grid
  p = clip.init_params(conv)
  assert p['vision']['patch_embed'].shape == (1, 1, 128, 128)
  assert set(p['vision']) - set(clip.init_params(patch)['vision']) == {'stem'}
  hf.save_hf_folder(conv, p, str(tmp_path))
  assert json.loads((tmp_path / hf.CONFIG_FILE).read_text())['vision_config']['vision_stem'] == 'conv'
  cfg2, p2 = hf.load_hf_folder(str(tmp_path))
  assert cfg2 == conv
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2)))
  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  out = clip.bind(conv, p).encode_image(images)
  assert out.shape == (3, 128)
  # The stem sees the image: changing one corner pixel moves the embedding.
  moved = images.copy()
  moved[:, 0, 0] += 1.0
  assert float(np.abs(clip.bind(conv, p).encode_image(moved) - out).max()) > 1e-4


def test_a_patch_stem_folder_has_no_stem_key(tmp_path):
  hf.save_hf_folder(clip.preset('tiny'), clip.init_params(clip.preset('tiny')), str(tmp_path))
  config = json.loads((tmp_path / hf.CONFIG_FILE).read_text())
  assert 'vision_stem' not in config['vision_config']
  assert 'logit_bias_init_value' not in config


@pytest.mark.parametrize('patch', [6, 12])
def test_conv_stem_needs_a_power_of_two_patch(patch):
  with pytest.raises(ValueError, match='power-of-two'):
    clip.preset('tiny', vision_stem='conv', patch_size=patch, image_size=48 if patch == 6 else 36)


def test_flop_count_adds_the_conv_stem_layers():
  from aesalign_jax import metrics
  patch, conv = clip.preset('tiny'), clip.preset('tiny', vision_stem='conv')
  # 32 -> 16 -> 8 -> 4 px, 3x3 kernels, then a 1x1 map into the width, in place of the 8x8
  # patch embedding (16 patches x 192 inputs x 128).
  stem = (16 * 16 * 9 * 3 * 32 + 8 * 8 * 9 * 32 * 64 + 4 * 4 * 9 * 64 * 128
          + 16 * 128 * 128 - 16 * 192 * 128)
  added = (metrics.clip_flops(conv, images=1, texts=0)
           - metrics.clip_flops(patch, images=1, texts=0))
  assert added == 2.0 * 3 * stem   # forward MACs x 2, backward counted as 2x forward
