"""input_pipeline/prepare_karpathy.py: a Karpathy split file becomes the JSONL a retrieval
evaluation reads."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from input_pipeline import prepare_karpathy, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sentences(*raws):
  return [{'raw': r, 'tokens': r.split(), 'sentid': i} for i, r in enumerate(raws)]


@pytest.fixture
def coco(tmp_path):
  """A hand-made dataset_coco.json: two test images (one without its file), one val, one
  test image without sentences."""
  images = tmp_path / 'coco'
  (images / 'val2014').mkdir(parents=True)
  for name in ('COCO_val2014_000000000001.jpg', 'COCO_val2014_000000000003.jpg'):
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(images / 'val2014' / name)
  data = {'dataset': 'coco', 'images': [
      {'filepath': 'val2014', 'filename': 'COCO_val2014_000000000001.jpg', 'split': 'test',
       'imgid': 0, 'cocoid': 1,
       'sentences': _sentences('A cat on a mat. ', 'a  cat\nsleeping', 'A grey cat.')},
      {'filepath': 'val2014', 'filename': 'COCO_val2014_000000000002.jpg', 'split': 'test',
       'imgid': 1, 'cocoid': 2, 'sentences': _sentences('A dog.')},          # file missing
      {'filepath': 'val2014', 'filename': 'COCO_val2014_000000000003.jpg', 'split': 'val',
       'imgid': 2, 'cocoid': 3, 'sentences': _sentences('A bird.')},
      {'filepath': 'val2014', 'filename': 'COCO_val2014_000000000004.jpg', 'split': 'test',
       'imgid': 3, 'cocoid': 4, 'sentences': []},
  ]}
  path = tmp_path / 'dataset_coco.json'
  path.write_text(json.dumps(data))
  return path, images


def test_cli_writes_one_line_per_test_image_that_jsonl_source_reads(coco, tmp_path):
  karpathy, images = coco
  out = tmp_path / 'out' / 'karpathy_test.jsonl'
  run = subprocess.run([sys.executable, '-m', 'input_pipeline.prepare_karpathy',
                        f'--karpathy_json={karpathy}', f'--images={images}', f'--out={out}'],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert run.returncode == 0, run.stderr
  assert 'wrote' in run.stdout and '1 images, 3 captions' in run.stdout
  assert '1 images missing' in run.stdout and '1 without a sentence' in run.stdout
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert lines == [{'image': 'val2014/COCO_val2014_000000000001.jpg',
                    'caption': 'A cat on a mat.',
                    'captions': ['A cat on a mat.', 'a cat sleeping', 'A grey cat.'],
                    'id': '1'}]
  source = sources.JsonlSource(out, root=images, image_size=32)
  assert len(source) == 1 and not source.skipped
  record = source[0]
  assert record['valid'] and record['caption'] == 'A cat on a mat.' and record['id'] == '1'
  assert record['image'].shape == (32, 32, 3)


def test_flickr_file_without_filepath_keeps_bare_filenames(tmp_path):
  (tmp_path / 'x.jpg').write_bytes(b'')
  path = tmp_path / 'dataset_flickr30k.json'
  path.write_text(json.dumps({'images': [
      {'filename': 'x.jpg', 'split': 'test', 'imgid': 7, 'sentences': _sentences('Two men.')}]}))
  records, counts = prepare_karpathy.convert(str(path), 'test', str(tmp_path))
  assert records == [{'image': 'x.jpg', 'caption': 'Two men.', 'captions': ['Two men.'],
                      'id': '7'}]
  assert counts == {'images': 1, 'captions': 1, 'no_sentences': 0, 'missing_files': 0}


def test_a_split_with_no_usable_image_is_refused_naming_the_file(coco):
  karpathy, images = coco
  with pytest.raises(ValueError, match=r"dataset_coco\.json: no usable image in split 'train'"):
    prepare_karpathy.convert(str(karpathy), 'train', str(images))


def test_a_file_that_is_not_a_karpathy_split_is_refused(tmp_path):
  path = tmp_path / 'other.json'
  path.write_text('[1, 2]')
  with pytest.raises(ValueError, match=r'other\.json: expected a Karpathy split file'):
    prepare_karpathy.convert(str(path), 'test')
