"""configs/real.py: every real-run variant builds its model, mesh, optimizer and sharded train
state (under jax.eval_shape, on fake CPU devices: no weights, no data), passes the config
checks other than its inputs, and names each missing input when a run starts.

No checkpoint exists here, so the shapes come from each variant's preset (configs.real.
shape_only clears model.hf_folder); the presets carry the published OpenAI shapes, and the
parameter counts below pin them to the real checkpoints.
"""

import json
import os
import subprocess
import sys

import pytest

from aesalign_jax import config_checks, mining
from aesalign_jax.models import clip, hf
from configs import real

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Parameters of openai/clip-vit-base-patch32, -base-patch16, -large-patch14.
PUBLISHED_PARAMS = {'vit_b32': 151.28e6, 'vit_b16': 149.62e6, 'vit_l14': 427.62e6}
# Devices each mesh is emulated on: one GPU, one 8-chip TPU host, a 32-chip slice (v5e-32).
DEVICES = {'gpu': 1, 'tpu8': 8, 'slice': 32}
FSDP = {'gpu': 1, 'tpu8': 4, 'slice': 8}


def _parts(variant):
  args = dict(item.split('=') for item in variant.split(','))
  return args['model'], args['mesh']


@pytest.fixture(scope='module')
def shapes():
  """{variant: what tests/real_config_shapes.py measured} (one subprocess, 32 fake devices)."""
  args = [f'{DEVICES[_parts(v)[1]]}:{v}' for v in real.VARIANTS]
  out = subprocess.run([sys.executable, os.path.join(HERE, 'real_config_shapes.py'), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr[-3000:]
  results = {r['variant']: r for r in map(json.loads, out.stdout.splitlines())}
  assert sorted(results) == sorted(real.VARIANTS)
  return results


def test_there_is_a_variant_for_every_model_and_mesh():
  assert len(real.VARIANTS) == 9
  assert {_parts(v) for v in real.VARIANTS} == {(m, h) for m in real.MODELS
                                                for h in real.MESHES}


@pytest.mark.parametrize('variant', real.VARIANTS)
def test_variant_names_every_input_of_a_real_run(variant):
  model, mesh = _parts(variant)
  c = real.get_config(variant)
  assert c.model.preset == model and c.model.hf_folder.startswith('/path/to/clip-vit-')
  assert c.tokenizer.folder == c.model.hf_folder          # the checkpoint's own tokenizer
  assert c.data.source == 'jsonl' and c.data.path.startswith('/path/to/')
  assert c.mine.queries_path.startswith('/path/to/')
  assert c.aesthetics.kind == 'iap' and c.aesthetics.iap.weights.endswith('.safetensors')
  assert c.rephrase.backend == ('hf' if mesh == 'gpu' else 'openai')
  assert c.model.dtype == 'bfloat16'
  assert {n: (e.type, e.get('source') or e.get('task') or e.get('path')) for n, e in
          c.evals.items()} == {
      'retrieval_coco': ('retrieval', 'data'), 'retrieval_flickr30k': ('retrieval', 'data'),
      'zeroshot_imagenet': ('zeroshot', 'tfds'), 'topk_quality': ('topk_quality', None),
      'hpir': ('hpir', '')}   # no HPIR file unless one is given
  assert c.evals.retrieval_coco.data.source == 'jsonl'
  assert c.evals.zeroshot_imagenet.tfds_name == 'imagenet2012'
  assert c.evals.topk_quality.queries_path.startswith('/path/to/')
  assert c.judge.kind == 'scorer'   # no ground-truth judge outside the world


def test_rephrase_backend_is_a_config_arg():
  assert real.get_config('mesh=tpu8,rephrase=hf').rephrase.backend == 'hf'
  assert real.get_config('mesh=gpu,rephrase=openai').rephrase.backend == 'openai'


@pytest.mark.parametrize('arg, match', [('model=vit_h14', 'model'), ('mesh=v5e', 'mesh'),
                                        ('rephrase=lexicon', 'rephrase'), ('smoke', 'unknown')])
def test_bad_config_args_are_refused_naming_them(arg, match):
  with pytest.raises(ValueError, match=match):
    real.get_config(arg)


@pytest.mark.parametrize('variant', real.VARIANTS)
def test_variant_passes_every_check_but_its_inputs(variant):
  model, mesh = _parts(variant)
  c = real.shape_only(real.get_config(variant))
  assert c.model.hf_folder == '' and c.model.preset == model
  cfg = config_checks.validate(c, num_devices=DEVICES[mesh], check_inputs=False)
  assert (cfg.dtype, cfg.remat) == ('bfloat16', (mesh, model) in real.REMAT)
  mining.validate(c.mine, c.align.u, c.align.v)   # top_k covers the stride pick


def test_a_batch_that_does_not_split_over_the_mesh_is_refused():
  c = real.shape_only(real.get_config('model=vit_b32,mesh=tpu8'))
  c.align.groups_per_step = 12
  with pytest.raises(ValueError, match=r'config\.align\.groups_per_step=12 is not divisible by '
                                       r'the 8 devices the batch is split over'):
    config_checks.validate(c, num_devices=8, check_inputs=False)


def test_an_iap_head_for_another_embedding_width_needs_its_own_clip():
  c = real.shape_only(real.get_config('model=vit_b32,mesh=gpu'))
  c.aesthetics.iap.clip_folder = ''    # the 768-wide LAION head on ViT-B/32's 512-wide space
  with pytest.raises(ValueError, match=r'config\.aesthetics\.iap\.embed_dim=768 differs from '
                                       r"the model's embedding width 512"):
    config_checks.validate(c, num_devices=1, check_inputs=False)


@pytest.mark.parametrize('variant', real.VARIANTS)
def test_parameter_count_is_the_published_checkpoints(shapes, variant):
  model, _ = _parts(variant)
  assert shapes[variant]['param_count'] == pytest.approx(PUBLISHED_PARAMS[model], rel=0.01)


@pytest.mark.parametrize('variant', real.VARIANTS)
def test_state_is_fp32_parameters_on_the_intended_mesh(shapes, variant):
  _, mesh = _parts(variant)
  r = shapes[variant]
  expected = {'gpu': {'data': 1, 'fsdp': 1}, 'tpu8': {'data': 2, 'fsdp': 4},
              'slice': {'data': 4, 'fsdp': 8}}[mesh]
  assert r['mesh'] == {**expected, 'tensor': 1}
  assert r['dtype'] == 'bfloat16'
  for kind in ('pretrain', 'align'):
    assert r[kind]['param_dtypes'] == ['float32']
    # params + two Adam moments, fp32: 12 bytes a parameter (plus a few scalars)
    assert r[kind]['state_bytes'] == pytest.approx(12 * r['param_count'], rel=1e-4)


@pytest.mark.parametrize('variant', [v for v in real.VARIANTS if _parts(v)[1] != 'gpu'])
def test_fsdp_shards_every_large_weight_and_its_adam_moments(shapes, variant):
  _, mesh = _parts(variant)
  fsdp = FSDP[mesh]
  for kind in ('pretrain', 'align'):
    r = shapes[variant][kind]
    width, mlp = r['fc1_shape']
    assert r['fc1_shard'] == [width // fsdp, mlp]
    assert r['fc1_mu_shard'] == [width // fsdp, mlp]
    vocab, text_width = r['token_embedding_shape']
    assert r['token_embedding_shard'] == [vocab, text_width // fsdp]
    assert r['whole_large_leaves'] == []
    # Only norms, biases and scalars stay whole: a device holds ~1/fsdp of the state.
    assert r['state_bytes_per_device'] <= 1.01 * r['state_bytes'] / fsdp


@pytest.mark.parametrize('variant', [v for v in real.VARIANTS if _parts(v)[1] == 'gpu'])
def test_gpu_mesh_keeps_the_whole_state_on_its_device(shapes, variant):
  r = shapes[variant]['align']
  assert r['state_bytes_per_device'] == r['state_bytes']
  assert r['fc1_shard'] == r['fc1_shape']
  assert r['state_bytes'] < 6e9    # ViT-L/14: 5.1 GB of an 80 GB H100, the rest for activations


@pytest.mark.parametrize('variant', ['model=vit_b32,mesh=gpu', 'model=vit_l14,mesh=tpu8'])
def test_missing_inputs_are_refused_naming_every_key(variant):
  c = real.get_config(variant)
  with pytest.raises(ValueError) as e:
    config_checks.validate(c, num_devices=DEVICES[_parts(variant)[1]])
  message = str(e.value)
  keys = ['model.hf_folder', 'tokenizer.folder', 'data.path', 'mine.queries_path',
          'aesthetics.iap.weights', 'rephrase.model', 'evals.retrieval_coco.data.path',
          'evals.retrieval_coco.data.root', 'evals.retrieval_flickr30k.data.path',
          'evals.zeroshot_imagenet.tfds_data_dir', 'evals.zeroshot_imagenet.class_names',
          'evals.topk_quality.queries_path']
  if _parts(variant)[0] != 'vit_l14':
    keys.append('aesthetics.iap.clip_folder')    # the ViT-L/14 the LAION head reads
  for key in keys:
    assert f'config.{key}' in message, (key, message)
  folder = real.HF_FOLDERS[_parts(variant)[0]]
  assert (f"config.model.hf_folder='{folder}': no such folder (a placeholder: set "
          '--config.model.hf_folder)') in message


def test_with_every_input_present_a_real_config_is_accepted(tmp_path):
  """Every stage reads the real inputs (tests/test_real_data_stages.py runs them), so a real
  config with every input present passes; what only the embedded world has (the world judge)
  is refused, naming the key."""
  c = real.get_config('model=vit_b32,mesh=gpu')
  folders = {}
  for name in ('vit_b32', 'vit_l14'):
    folders[name] = tmp_path / name
    folders[name].mkdir()
    (folders[name] / hf.CONFIG_FILE).write_text(json.dumps(hf.config_to_hf(clip.preset(name))))
  files = {}
  for key in ('data.path', 'mine.queries_path', 'aesthetics.iap.weights',
              'evals.retrieval_coco.data.path', 'evals.retrieval_flickr30k.data.path',
              'evals.zeroshot_imagenet.class_names', 'evals.topk_quality.queries_path'):
    files[key] = tmp_path / key.replace('.', '_')
    files[key].write_text('')
  with c.unlocked():
    c.model.hf_folder = c.tokenizer.folder = str(folders['vit_b32'])
    c.aesthetics.iap.clip_folder = str(folders['vit_l14'])   # the LAION head's ViT-L/14
    c.rephrase.model = str(folders['vit_b32'])
    for key, path in files.items():
      *sections, field = key.split('.')
      section = c
      for s in sections:
        section = section[s]
      section[field] = str(path)
    for name in ('retrieval_coco', 'retrieval_flickr30k'):
      c.evals[name].data.root = str(tmp_path)
    c.evals.zeroshot_imagenet.tfds_data_dir = str(tmp_path)
  config_checks.validate(c, num_devices=1)
  c.judge.kind = 'world'
  with pytest.raises(ValueError, match='inputs the stages cannot read') as e:
    config_checks.validate(c, num_devices=1)
  assert "config.judge.kind='world'" in str(e.value)
  for key in ('config.data.source', 'config.mine.queries_path', 'config.evals'):
    assert key not in str(e.value)


def test_main_refuses_a_real_config_with_placeholder_paths_before_running(tmp_path):
  workdir = tmp_path / 'run'
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'),
                        '--config=configs/real.py:model=vit_b32,mesh=gpu',
                        f'--workdir={workdir}', '--mode=pretrain'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'refused config: missing inputs' in out.stderr
  assert "config.model.hf_folder='/path/to/clip-vit-base-patch32'" in out.stderr
  assert not workdir.exists()
