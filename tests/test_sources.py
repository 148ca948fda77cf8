"""sources.py: folder / JSONL / CSV / tfds sources, and every kind of bad input record.

Decodable oddities are converted correctly; unusable records are skipped, counted and
named in a warning; a pipeline over them never crashes.
"""

import io
import json
import logging
import os
import struct
import sys
import types
import zlib

import numpy as np
import pytest
from absl import flags
from PIL import Image

from input_pipeline import pipeline, sources

flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags

S = 16  # image size of the records


def _png_1bit(width, height) -> bytes:
  """A huge but tiny-on-disk 1-bit PNG written by hand."""
  def chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
  comp = zlib.compressobj(9)
  row = b"\x00" + bytes((width + 7) // 8)
  data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
  return (b"\x89PNG\r\n\x1a\n"
          + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
          + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _save(path, image, fmt, **kw):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, fmt, **kw)


# The decodable images and the colour each must have after decoding (uniform images).
GOOD = {
    "good/red.png": (200, 0, 0),
    "good/cmyk_white.jpg": (255, 255, 255),
    "good/gray16_max.png": (255, 255, 255),
    "good/rgba_transparent.png": (255, 255, 255),
    "good/palette.png": (0, 0, 200),
    "good/gray.png": (77, 77, 77),
}
# Files that exist but cannot be decoded: caught lazily, at read time.
UNDECODABLE = ["bad/truncated.jpg", "bad/empty.jpg", "bad/not_an_image.jpg", "bad/huge.png"]


def _make_images(root):
  _save(root / "good/red.png", Image.new("RGB", (40, 24), (200, 0, 0)), "PNG")
  _save(root / "good/cmyk_white.jpg", Image.new("CMYK", (20, 20), (0, 0, 0, 0)), "JPEG")
  _save(root / "good/gray16_max.png",
        Image.fromarray(np.full((20, 30), 65535, np.uint16)), "PNG")
  _save(root / "good/rgba_transparent.png", Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "PNG")
  palette = Image.new("P", (20, 20), 1)
  palette.putpalette([0, 0, 0, 0, 0, 200] + [0] * 762)
  _save(root / "good/palette.png", palette, "PNG", transparency=0)
  _save(root / "good/gray.png", Image.new("L", (24, 20), 77), "PNG")
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
  (root / "bad").mkdir()
  (root / "bad/truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  (root / "bad/empty.jpg").write_bytes(b"")
  (root / "bad/not_an_image.jpg").write_bytes(b"<html>404 not found</html>\n")
  (root / "bad/huge.png").write_bytes(_png_1bit(8000, 6500))  # 52 MP > 50 MP default


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """tmp/corpus/{good,bad}/..., tmp/outside.png, corpus/link_out.png -> ../outside.png."""
  base = tmp_path_factory.mktemp("data")
  root = base / "corpus"
  root.mkdir()
  _make_images(root)
  _save(base / "outside.png", Image.new("RGB", (8, 8)), "PNG")
  os.symlink(base / "outside.png", root / "link_out.png")
  return root


def _jsonl_lines(root):
  """(bytes line, what it is) for every case; None = a usable record."""
  def rec(image, caption="a caption"):
    return json.dumps({"image": image, "caption": caption}).encode()
  lines = [(rec(p, f"caption of {p}"), None) for p in GOOD]
  lines += [(rec(p), None) for p in UNDECODABLE]
  lines += [
      (rec("good/missing.png"), "missing_file"),
      (rec("../outside.png"), "path_escapes_root"),
      (rec("good/../../outside.png"), "path_escapes_root"),
      (rec(str(root.parent / "outside.png")), "path_escapes_root"),  # absolute, outside
      (rec("link_out.png"), "path_escapes_root"),                     # symlink out
      (b'{"image": "good/red.png", "caption": ', "malformed_json"),
      (b"[1, 2]", "malformed_json"),
      (rec("good/red.png", "   "), "empty_caption"),
      (b'{"image": "good/red.png", "caption": "caf\xe9 au lait"}', "non_utf8_caption"),
      (json.dumps({"image": "good/red.png"}).encode(), "missing_field"),
      (rec("good/red.png", 42), "missing_field"),
  ]
  return lines


@pytest.fixture(scope="module")
def jsonl_file(corpus):
  lines = _jsonl_lines(corpus)
  path = corpus / "captions.jsonl"
  path.write_bytes(b"\n".join(line for line, _ in lines) + b"\n\n")  # + a blank line
  return path, lines


# ---------------------------------------------------------------------------------------
# JSON Lines

def test_jsonl_metadata_problems_are_skipped_at_index_time_counted_and_named(
    jsonl_file, caplog):
  path, lines = jsonl_file
  with caplog.at_level(logging.WARNING, logger="input_pipeline.sources"):
    src = sources.JsonlSource(path, image_size=S)
  assert len(src) == len(GOOD) + len(UNDECODABLE)
  expected = {f"{path}:{n}": kind for n, (_, kind) in enumerate(lines, start=1) if kind}
  assert {s.origin: s.kind for s in src.skipped} == expected
  stats = src.stats()
  assert stats["records"] == len(src) and stats["skipped_at_index"] == len(expected)
  assert stats["skipped_at_read"] == 0
  warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  for origin in expected:
    assert f"{origin}: " in warning
  assert f"skipped {len(expected)} of {len(lines)} records" in warning


def test_jsonl_decodable_images_are_converted_correctly(jsonl_file):
  src = sources.JsonlSource(jsonl_file[0], image_size=S)
  by_id = {src[i]["id"]: src[i] for i in range(len(src))}
  for rel, colour in GOOD.items():
    record = by_id[rel]
    assert record["valid"] and record["error"] == ""
    assert record["image"].dtype == np.uint8 and record["image"].shape == (S, S, 3)
    np.testing.assert_allclose(record["image"].reshape(-1, 3), [colour] * S * S, atol=1)
    assert record["caption"] == f"caption of {rel}"


def test_undecodable_images_come_back_flagged_invalid_not_raised(jsonl_file):
  src = sources.JsonlSource(jsonl_file[0], image_size=S)
  by_id = {src[i]["id"]: src[i] for i in range(len(src))}
  reasons = {"bad/truncated.jpg": "truncated", "bad/empty.jpg": "zero-byte",
             "bad/not_an_image.jpg": "not a recognised image", "bad/huge.png": "too large"}
  for rel, reason in reasons.items():
    record = by_id[rel]
    assert not record["valid"]
    assert rel in record["error"] and reason in record["error"]
    assert record["image"].shape == (S, S, 3)  # same structure as a valid record


@pytest.mark.parametrize("worker_count", [0, 1])
def test_pipeline_over_bad_records_never_crashes_and_counts_each_once(
    jsonl_file, caplog, worker_count):
  src = sources.JsonlSource(jsonl_file[0], image_size=S)
  with caplog.at_level(logging.WARNING, logger="input_pipeline.sources"):
    ds = pipeline.make_pipeline(src, batch_size=4, seed=3, num_epochs=2, read_threads=2,
                                drop_remainder=False, shard_index=0, shard_count=1,
                                worker_count=worker_count)
    batches = list(ds)
  ids = [i for b in batches for i in b["id"].tolist()]
  assert sorted(ids) == sorted(list(GOOD) * 2)  # two epochs of exactly the good records
  assert all(set(b) == {"image", "caption", "id"} for b in batches)
  stats = src.stats()
  assert stats["skipped_at_read"] == len(UNDECODABLE)  # once each, not once per epoch
  assert stats["skipped_by_kind"]["undecodable_image"] == len(UNDECODABLE)
  warning = "\n".join(r.getMessage() for r in caplog.records)
  for rel in UNDECODABLE:
    assert warning.count(rel) == 1
  assert f"{jsonl_file[0]}:" in warning  # names the JSONL line too


def test_jsonl_root_can_differ_from_the_file_folder(corpus, tmp_path):
  path = tmp_path / "elsewhere.jsonl"
  path.write_text(json.dumps({"image": "good/red.png", "caption": "red", "id": "r1"}) + "\n")
  src = sources.JsonlSource(path, root=corpus, image_size=S)
  assert len(src) == 1 and src[0]["id"] == "r1" and src[0]["caption"] == "red"
  assert len(sources.JsonlSource(path, image_size=S)) == 0  # relative to tmp_path: missing


# ---------------------------------------------------------------------------------------
# CSV

def test_csv_source_reads_header_columns_and_skips_bad_rows(corpus, caplog):
  path = corpus / "captions.csv"
  rows = [b"image,caption,id",
          b"good/red.png,\"a red, wide box\",r1",
          b"good/gray.png,gray,g1",
          b"../outside.png,escaping,e1",
          b"good/red.png,,empty",
          b"good/red.png,\xff\xfe bad bytes,nonutf8",
          b"good/missing.png,missing,m1",
          b"bad/truncated.jpg,truncated,t1"]
  path.write_bytes(b"\n".join(rows) + b"\n")
  with caplog.at_level(logging.WARNING, logger="input_pipeline.sources"):
    src = sources.CsvSource(path, image_size=S)
  assert [src[i]["id"] for i in range(len(src))] == ["r1", "g1", "t1"]
  assert src[0]["caption"] == "a red, wide box"
  assert {s.origin: s.kind for s in src.skipped} == {
      f"{path}:4": "path_escapes_root", f"{path}:5": "empty_caption",
      f"{path}:6": "non_utf8_caption", f"{path}:7": "missing_file"}
  assert f"{path}:6: non_utf8_caption" in caplog.text
  assert not src[2]["valid"]


def test_csv_rows_are_named_by_the_physical_line_where_they_start(corpus, caplog):
  """Quoted fields over several lines, a blank line, text after a closing quote and a quote
  never closed: every skipped or failing row is named by the line it starts on."""
  path = corpus / "lines.csv"
  rows = ["image,caption,id",                              # line 1
          'good/red.png,"a caption over',                  # 2-3: one row
          'two lines",r1',
          'bad/truncated.jpg,"truncated over',             # 4-5: fails at read time
          'two lines",t1',
          "",                                              # 6: blank
          'good/missing.png,"missing over',                # 7-8: no such file
          'two lines",m1',
          'good/red.png,"closed"then text,x1',             # 9: malformed
          "good/gray.png,gray,g1",                         # 10
          'good/gray.png,"never closed,u1',                # 11-12: runs to the end
          "good/red.png,swallowed,s1"]
  path.write_text("\n".join(rows) + "\n")
  with caplog.at_level(logging.WARNING, logger="input_pipeline.sources"):
    src = sources.CsvSource(path, image_size=S)
  assert src.ids == ["r1", "t1", "g1"]
  assert src[0]["caption"] == "a caption over\ntwo lines"
  assert {s.origin: s.kind for s in src.skipped} == {
      f"{path}:7": "missing_file", f"{path}:9": "malformed_csv",
      f"{path}:11": "malformed_csv"}
  unterminated = next(s for s in src.skipped if s.origin == f"{path}:11")
  assert "line 12" in unterminated.detail, unterminated
  assert f"{path}:11: malformed_csv" in caplog.text
  assert src[1]["error"].startswith(f"{path}:4: undecodable_image")


def test_csv_without_required_columns_is_refused_naming_the_file(tmp_path):
  path = tmp_path / "wrong.csv"
  path.write_text("file,text\na.png,hello\n")
  with pytest.raises(ValueError, match=r"wrong\.csv.*'image' and 'caption'"):
    sources.CsvSource(path)


# ---------------------------------------------------------------------------------------
# Folder with sidecar captions

def test_folder_source_pairs_images_with_sidecar_captions_and_skips_bad_ones(
    corpus, tmp_path, caplog):
  root = tmp_path / "folder"
  (root / "sub").mkdir(parents=True)
  _save(root / "a.png", Image.new("RGB", (20, 30), (0, 90, 0)), "PNG")
  (root / "a.txt").write_text("  a green box\n")
  _save(root / "sub/b.JPG", Image.new("L", (30, 20), 128), "JPEG")
  (root / "sub/b.txt").write_text("a gray box")
  _save(root / "no_caption.png", Image.new("RGB", (8, 8)), "PNG")
  _save(root / "empty_caption.png", Image.new("RGB", (8, 8)), "PNG")
  (root / "empty_caption.txt").write_text(" \n")
  _save(root / "latin1.png", Image.new("RGB", (8, 8)), "PNG")
  (root / "latin1.txt").write_bytes(b"caf\xe9")
  os.symlink(corpus.parent / "outside.png", root / "escape.png")
  (root / "escape.txt").write_text("a secret")
  (root / "broken.jpg").write_bytes(b"")
  (root / "broken.txt").write_text("zero bytes")
  (root / "notes.md").write_text("ignored: not an image extension")

  with caplog.at_level(logging.WARNING, logger="input_pipeline.sources"):
    src = sources.FolderSource(root, image_size=S)
  assert [src[i]["id"] for i in range(len(src))] == ["a.png", "broken.jpg", "sub/b.JPG"]
  assert src[0]["caption"] == "a green box"
  np.testing.assert_array_equal(src[0]["image"], np.broadcast_to([0, 90, 0], (S, S, 3)))
  assert abs(int(src[2]["image"].astype(int).mean()) - 128) <= 1
  assert {s.origin: s.kind for s in src.skipped} == {
      "no_caption.png": "missing_caption_file", "empty_caption.png": "empty_caption",
      "latin1.png": "non_utf8_caption", "escape.png": "path_escapes_root"}
  for name in ["no_caption.png", "empty_caption.png", "latin1.png", "escape.png"]:
    assert name in caplog.text
  assert not src[1]["valid"] and "zero-byte" in src[1]["error"]


# ---------------------------------------------------------------------------------------
# tfds (ArrayRecord data sources, mocked: no TensorFlow, no download)

def test_tfds_source_maps_mnist_to_rgb_records_with_class_captions():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    src = sources.TfdsSource("mnist", split="train", image_size=S)
    raw = tfds.data_source("mnist", split="train")
    assert len(src) == 6
    for i in range(len(src)):
      record, example = src[i], raw[i]
      assert record["image"].dtype == np.uint8 and record["image"].shape == (S, S, 3)
      assert (record["image"] == record["image"][..., :1]).all()  # gray repeated
      label = int(example["label"])
      assert record["label"] == label
      assert record["caption"] == f"a photo of a {label}."  # mnist class names are digits
      assert record["id"] == f"mnist:train:{i}" and record["valid"]


def test_tfds_source_reads_text_and_id_features_and_runs_in_a_pipeline():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=8):
    src = sources.TfdsSource("cifar10", split="test", image_size=32, caption_key="id",
                             id_key="id", label_key="label")
    raw = tfds.data_source("cifar10", split="test")
    record = src[3]
    np.testing.assert_array_equal(record["image"], raw[3]["image"])  # 32x32: unchanged
    raw_id = raw[3]["id"]
    raw_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
    assert record["id"] == raw_id and record["caption"] == raw_id.strip()
    batches = list(pipeline.make_pipeline(src, batch_size=4, seed=0, num_epochs=1,
                                          shard_index=0, shard_count=1))
  assert [b["image"].shape for b in batches] == [(4, 32, 32, 3)] * 2
  assert sorted(i for b in batches for i in b["id"].tolist()) == sorted(
      src[i]["id"] for i in range(8))


class _FakeDataSource:
  """What tfds.data_source returns, for a 3-class dataset of 2x2 gray images."""

  def __init__(self, names):
    label = types.SimpleNamespace(names=names)
    self.dataset_info = types.SimpleNamespace(features={"label": label})
    self._examples = [{"image": np.full((2, 2, 1), 10 * i, np.uint8), "label": i % 3}
                      for i in range(5)]

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    return self._examples[index]


def test_tfds_source_class_names_come_from_the_builder_info(monkeypatch):
  names = ["angular_leaf_spot", "bean_rust", "healthy"]
  fake = types.ModuleType("tensorflow_datasets")
  fake.data_source = lambda name, **kwargs: _FakeDataSource(names)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  src = sources.TfdsSource("beans", split="test", image_size=4)
  assert src.class_names() == names
  assert [src[i]["caption"] for i in (0, 4)] == ["a photo of a angular_leaf_spot.",
                                                 "a photo of a bean_rust."]
  assert src.stats()["records"] == 5 and src.skipped == []
  unlabelled = sources.TfdsSource("beans", split="test", caption_key="label", label_key=None)
  with pytest.raises(ValueError, match="no label_key"):
    unlabelled.class_names()
