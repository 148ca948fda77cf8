"""Alignment killed after a checkpoint resumes exactly: the align stage on a JSON Lines corpus and
a mined-format D_po file, through the grain pipelines a real run uses (subprocess runs)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from aesalign_jax import tokenizer
from aesalign_jax.models import clip, hf
from input_pipeline import preference

HERE = os.path.dirname(os.path.abspath(__file__))
COLOURS = ((220, 30, 30), (30, 180, 60), (40, 60, 220), (230, 210, 40))
TINY = dict(patch_size=16, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp=64,
            text_width=32, text_layers=1, text_heads=2, text_mlp=64, context_length=16,
            embed_dim=32)


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """What the worker's align run reads: 40 PNGs and a corrupt one (corpus.jsonl), a tiny model
  folder with its tokenizer, and 11 groups written as the mine stage writes them, one naming
  the corrupt image (the stream drops it)."""
  root = tmp_path_factory.mktemp('align_inputs')
  rng = np.random.default_rng(0)
  (root / 'images').mkdir()
  lines = []
  for i in range(40):
    image = rng.integers(60, 200, size=(32, 32, 3)).astype(np.uint8)
    image[8:24, 4 + i % 8:20 + i % 8] = COLOURS[i % 4]
    Image.fromarray(image).save(root / 'images' / f'{i}.png')
    lines.append({'image': f'images/{i}.png', 'id': f'img{i}',
                  'caption': f'a photo of colour {i % 4} number {i}'})
  (root / 'images' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not a png' * 20)
  lines.insert(7, {'image': 'images/broken.png', 'id': 'broken', 'caption': 'a broken photo'})
  (root / 'corpus.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
  queries = [f'query number {g}' for g in range(11)]
  tok = tokenizer.train_bpe([l['caption'] for l in lines] + queries, vocab_size=300,
                            folder=root / 'model', context_length=16)
  cfg = clip.preset('tiny', **TINY, vocab_size=300, eos_token_id=tok.eos_token_id)
  # Any finite weights will do (drawn with numpy: clip.init_params runs eagerly, ~5 s here).
  params = jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(np.float32),
                        clip.abstract_params(cfg))
  hf.save_hf_folder(cfg, params, str(root / 'model'))
  groups = []
  for g, query in enumerate(queries):
    ids = [f'img{i}' for i in rng.choice(40, size=4, replace=False)]
    if g == 5:
      ids[2] = 'broken'
    groups.append(preference.PreferenceGroup(
        query=query, rephrased_query=query + ', beautiful', image_ids=ids,
        aesthetic_scores=[0.9, 0.1, 0.8, 0.2], semantic_scores=[0.5, 0.5, 0.3, 0.3],
        ref_scores=rng.normal(0, 0.1, size=4).tolist(), u=2, v=2, stride=2))
  preference.write_groups(root / 'dpo.arrayrecord', groups)
  return root


def _worker(inputs, workdir, *args):
  # The runs share a compilation cache: the second and third load the step the first compiled.
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(inputs / 'jax_cache'))
  return subprocess.run([sys.executable, os.path.join(HERE, 'train_worker.py'), '--kind',
                         'align', '--inputs', str(inputs), '--workdir', str(workdir),
                         '--steps', '6', '--checkpoint_every', '3', *map(str, args)],
                        capture_output=True, text=True, env=env, timeout=600)


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_killed_alignment_resumes_to_identical_parameters_and_data_order(inputs, tmp_path):
  straight = _worker(inputs, tmp_path / 'straight')
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = _worker(inputs, tmp_path / 'resumed', '--kill_after_save', 3)
  assert killed.returncode == -9   # SIGKILL right after the step-3 checkpoint reached disk
  stage = tmp_path / 'resumed' / 'align'
  assert sorted(os.listdir(stage / 'checkpoints')) == ['3']
  assert not (stage / 'stage.json').exists()   # the stage is unfinished, so it resumes
  resumed = _worker(inputs, tmp_path / 'resumed')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from the checkpoint at step 3' in resumed.stderr
  for stream in ('pairs', 'groups'):
    want = _lines(tmp_path / 'straight' / f'order_{stream}.jsonl')
    assert len(want) == 6, stream   # a line per step: here 1-3 by the killed run, 4-6 resumed
    assert _lines(tmp_path / 'resumed' / f'order_{stream}.jsonl') == want, (
        f'{stream}: the resumed run read other data than the straight run')
  pairs = [i for batch in _lines(tmp_path / 'straight' / 'order_pairs.jsonl') for i in batch]
  groups = [q for batch in _lines(tmp_path / 'straight' / 'order_groups.jsonl') for q in batch]
  # Both streams ran into their second epoch, past the record each of them drops.
  assert 'broken' not in pairs and len(set(pairs)) == 40
  assert 'query number 5' not in groups and len(set(groups)) == 10
  a = np.load(tmp_path / 'straight' / 'params.npz')
  b = np.load(tmp_path / 'resumed' / 'params.npz')
  assert a.files == b.files and len(a.files) > 10
  for key in a.files:
    assert np.array_equal(a[key], b[key]), key              # bitwise on CPU
