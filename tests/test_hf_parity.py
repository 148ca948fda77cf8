"""Our Flax CLIP against transformers' PyTorch CLIPModel: import, export, numerics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from aesalign_jax.models import clip, hf  # noqa: E402

# Different patch and image sizes, widths, depths, heads, projections and activations.
VARIANTS = {
    'quick_gelu_p4': dict(
        text=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=12, hidden_act='quick_gelu',
                  eos_token_id=98),
        vision=dict(image_size=16, patch_size=4, hidden_size=48, intermediate_size=64,
                    num_hidden_layers=3, num_attention_heads=6, hidden_act='quick_gelu'),
        projection_dim=24),
    'gelu_p8': dict(
        text=dict(vocab_size=150, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=8, max_position_embeddings=20, hidden_act='gelu',
                  eos_token_id=149),
        vision=dict(image_size=32, patch_size=8, hidden_size=40, intermediate_size=80,
                    num_hidden_layers=2, num_attention_heads=5, hidden_act='gelu'),
        projection_dim=16),
    'mixed_p7': dict(
        text=dict(vocab_size=64, hidden_size=24, intermediate_size=50, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=9, hidden_act='gelu',
                  eos_token_id=63),
        vision=dict(image_size=28, patch_size=7, hidden_size=36, intermediate_size=72,
                    num_hidden_layers=4, num_attention_heads=3, hidden_act='quick_gelu'),
        projection_dim=40),
}
TOL = 1e-4


def _random_hf_model(variant: dict, seed: int):
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(text_config=variant['text'],
                                   vision_config=variant['vision'],
                                   projection_dim=variant['projection_dim'])
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():  # default init leaves biases and LNs trivial; randomise everything
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
    model.logit_scale.fill_(2.3)
  return model


def _inputs(variant: dict, batch: int, seed: int):
  """Random pixels and padded token rows: BOS, random ids, EOS, then EOS-id padding."""
  rng = np.random.default_rng(seed)
  v, t = variant['vision'], variant['text']
  pixels = rng.normal(size=(batch, 3, v['image_size'], v['image_size'])).astype(np.float32)
  length, eos = t['max_position_embeddings'], t['eos_token_id']
  ids = np.full((batch, length), eos, np.int64)
  mask = np.zeros((batch, length), np.int64)
  for b in range(batch):
    n = rng.integers(1, length - 1) if b else length - 2   # row 0 fills the context
    ids[b, 0] = eos - 1                                     # stands in for BOS
    ids[b, 1:n + 1] = rng.integers(0, eos - 1, size=n)
    mask[b, :n + 2] = 1
  return pixels, ids, mask


def _torch_outputs(model, pixels, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                pixel_values=torch.from_numpy(pixels))
  return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def _our_outputs(cfg, params, pixels, ids):
  model = clip.bind(cfg, params)
  eos = clip.eos_positions(ids, cfg.eos_token_id)
  img, txt, scale = model(jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids), eos)
  return np.asarray(img), np.asarray(txt), np.asarray(scale * img @ txt.T)


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def hf_folder(request, tmp_path_factory):
  variant = VARIANTS[request.param]
  model = _random_hf_model(variant, seed=len(request.param))
  folder = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(folder)  # safetensors by default
  return variant, model, folder


def test_imported_model_matches_transformers_on_padded_batches(hf_folder):
  variant, model, folder = hf_folder
  cfg, params = hf.load_hf_folder(folder)
  pixels, ids, mask = _inputs(variant, batch=5, seed=1)
  want = _torch_outputs(model, pixels, ids, mask)
  got = _our_outputs(cfg, params, pixels, ids)
  for name, w, g in zip(('image_embeds', 'text_embeds', 'logits_per_image'), want, got):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, atol=TOL, rtol=0, err_msg=name)
  # Not trivially equal: different inputs give different embeddings.
  assert np.abs(got[0][0] - got[0][1]).max() > 1e-2


def test_padding_does_not_change_text_embeddings(hf_folder):
  variant, _, folder = hf_folder
  cfg, params = hf.load_hf_folder(folder)
  _, ids, _ = _inputs(variant, batch=3, seed=2)
  model = clip.bind(cfg, params)
  eos = clip.eos_positions(ids, cfg.eos_token_id)
  padded = ids.copy()
  padded[padded == cfg.eos_token_id] = 0   # change every padding id (and the EOS itself...)
  for b, e in enumerate(np.asarray(eos)):  # ...then restore EOS so the pooled token agrees
    padded[b, e] = cfg.eos_token_id
  a = model.encode_text(jnp.asarray(ids), eos)
  b = model.encode_text(jnp.asarray(padded), eos)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_export_loads_in_transformers_and_round_trips_exactly(hf_folder, tmp_path):
  variant, _, folder = hf_folder
  cfg, params = hf.load_hf_folder(folder)
  # Perturb so the export is not just the file we read.
  params = jax.tree.map(lambda x: x + 0.01, params)
  out = str(tmp_path / 'export')
  hf.save_hf_folder(cfg, params, out)
  reloaded = transformers.CLIPModel.from_pretrained(out).eval()
  pixels, ids, mask = _inputs(variant, batch=4, seed=3)
  want = _our_outputs(cfg, params, pixels, ids)
  got = _torch_outputs(reloaded, pixels, ids, mask)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, atol=TOL, rtol=0)
  cfg2, params2 = hf.load_hf_folder(out)
  assert cfg2 == cfg
  flat1, tree1 = jax.tree.flatten(params)
  flat2, tree2 = jax.tree.flatten(params2)
  assert tree1 == tree2
  for a, b in zip(flat1, flat2):
    assert np.array_equal(np.asarray(a), b)


# ------------------------------------------------------------------------- bad checkpoints


def _small_export(tmp_path):
  cfg = clip.ClipConfig(image_size=16, patch_size=8, vision_width=16, vision_layers=1,
                        vision_heads=2, vision_mlp=32, vocab_size=20, context_length=6,
                        text_width=16, text_layers=1, text_heads=2, text_mlp=32, embed_dim=8,
                        eos_token_id=19)
  folder = tmp_path / 'ckpt'
  hf.save_hf_folder(cfg, clip.init_params(cfg), str(folder))
  return folder


def test_folder_without_safetensors_is_refused_naming_it(tmp_path):
  folder = _small_export(tmp_path)
  os.remove(folder / 'model.safetensors')
  (folder / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(hf.CheckpointError, match='model.safetensors.*pytorch_model.bin.*never'):
    hf.load_hf_folder(str(folder))


def test_config_of_another_model_type_is_refused_naming_file_and_key(tmp_path):
  folder = _small_export(tmp_path)
  config = json.loads((folder / 'config.json').read_text())
  config['model_type'] = 'bert'
  (folder / 'config.json').write_text(json.dumps(config))
  with pytest.raises(hf.CheckpointError, match=r'config\.json.*model_type.*bert'):
    hf.load_hf_folder(str(folder))


def test_truncated_safetensors_is_refused_naming_the_file(tmp_path):
  folder = _small_export(tmp_path)
  path = folder / 'model.safetensors'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(hf.CheckpointError, match='model.safetensors'):
    hf.load_hf_folder(str(folder))


def test_wrong_shape_parameter_is_refused_naming_file_and_key(tmp_path):
  import safetensors.numpy
  folder = _small_export(tmp_path)
  path = str(folder / 'model.safetensors')
  tensors = safetensors.numpy.load_file(path)
  key = 'text_model.encoder.layers.0.mlp.fc1.weight'
  tensors[key] = np.zeros((33, 16), np.float32)
  safetensors.numpy.save_file(tensors, path)
  with pytest.raises(hf.CheckpointError, match=r'model\.safetensors.*mlp\.fc1\.weight.*\(33, 16\)'):
    hf.load_hf_folder(str(folder))


def test_missing_tensor_is_refused_naming_the_key(tmp_path):
  import safetensors.numpy
  folder = _small_export(tmp_path)
  path = str(folder / 'model.safetensors')
  tensors = safetensors.numpy.load_file(path)
  del tensors['vision_model.post_layernorm.bias']
  safetensors.numpy.save_file(tensors, path)
  with pytest.raises(hf.CheckpointError, match='post_layernorm.bias'):
    hf.load_hf_folder(str(folder))
