"""COCO / Flickr30K Karpathy splits -> the JSON Lines file a retrieval evaluation reads.

  python -m input_pipeline.prepare_karpathy --karpathy_json dataset_coco.json \
      --images /data/coco --split test --out /data/coco/karpathy_test.jsonl

Input: Karpathy's dataset_coco.json or dataset_flickr30k.json ({"images": [{"filepath":
"val2014" (COCO only), "filename": "...jpg", "split": "train|restval|val|test", "imgid",
"cocoid" (COCO only), "sentences": [{"raw": "..."}, ...]}, ...]}).
Output: one line per image of the split, in the file's order, image paths relative to --images:

  {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": "<first sentence>",
   "captions": ["<first sentence>", ..., "<fifth>"], "id": "391895"}

input_pipeline.sources.JsonlSource reads "image", "caption" and "id" (set data.root to the
--images folder); "captions" keeps every reference sentence for evaluators that take several.
"""

from __future__ import annotations

import argparse
import json
import os


def convert(karpathy_json: str, split: str, images: str | None = None) -> tuple[list, dict]:
  """(records, counts) for the images of `split`; counts: images, captions, and the images
  left out for having no sentence or (with `images`) no file under that folder."""
  with open(karpathy_json, encoding='utf-8') as f:
    data = json.load(f)
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise ValueError(f'{karpathy_json}: expected a Karpathy split file {{"images": [...]}}')
  records = []
  counts = {'images': 0, 'captions': 0, 'no_sentences': 0, 'missing_files': 0}
  for n, item in enumerate(data['images']):
    if item.get('split') != split:
      continue
    if 'filename' not in item:
      raise ValueError(f'{karpathy_json}: images[{n}] has no "filename"')
    path = '/'.join(p for p in (item.get('filepath', ''), item['filename']) if p)
    captions = [' '.join(str(s.get('raw', '')).split()) for s in item.get('sentences', [])]
    captions = [c for c in captions if c]
    if not captions:
      counts['no_sentences'] += 1
      continue
    if images is not None and not os.path.isfile(os.path.join(images, path)):
      counts['missing_files'] += 1
      continue
    record_id = item.get('cocoid', item.get('imgid', path))
    records.append({'image': path, 'caption': captions[0], 'captions': captions,
                    'id': str(record_id)})
    counts['images'] += 1
    counts['captions'] += len(captions)
  if not records:
    raise ValueError(f'{karpathy_json}: no usable image in split {split!r} ({counts})')
  return records, counts


def write_jsonl(records: list, out: str) -> None:
  """Writes the records one JSON object a line, atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')
  os.replace(tmp, out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--karpathy_json', required=True,
                      help='dataset_coco.json or dataset_flickr30k.json')
  parser.add_argument('--images', required=True,
                      help='the folder image paths are relative to (COCO: the one holding '
                           'val2014/; Flickr30K: the one holding the .jpg files)')
  parser.add_argument('--split', default='test', help='train | restval | val | test')
  parser.add_argument('--out', required=True, help='the .jsonl file to write')
  args = parser.parse_args(argv)
  records, counts = convert(args.karpathy_json, args.split, args.images)
  write_jsonl(records, args.out)
  print(f'wrote {args.out}: {counts["images"]} images, {counts["captions"]} captions of split '
        f'{args.split!r}; left out {counts["missing_files"]} images missing under '
        f'{args.images} and {counts["no_sentences"]} without a sentence')


if __name__ == '__main__':
  main()
