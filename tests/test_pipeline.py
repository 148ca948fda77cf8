"""pipeline.py: grain pipelines: shuffling by seed, batching, sharding, invalid-record
filtering, optional normalisation and tokenisation, and checkpointable iterator state."""

import json

import grain
import numpy as np
import pytest
from absl import flags

from input_pipeline import images, pipeline

# grain worker processes read absl flags.
flags.FLAGS.mark_as_parsed()

N = 30
BAD = {4, 17}  # records that "fail to decode"


class ToySource:
  """Deterministic records; record i's image is filled with i; BAD ones are invalid."""

  def __init__(self, n=N, bad=frozenset(BAD)):
    self.n, self.bad, self.failures = n, bad, []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((4, 4, 3), i, np.uint8), "caption": f"caption {i}",
            "id": f"r{i}", "valid": i not in self.bad, "error": f"rec{i}: broken"}

  def record_read_failure(self, error):
    self.failures.append(error)


def _ids(batches):
  return [b["id"].tolist() for b in batches]


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def _pipe(source=None, **kw):
  args = dict(batch_size=4, seed=7, read_threads=2, shard_index=0, shard_count=1)
  args.update(kw)
  return pipeline.make_pipeline(source or ToySource(), **args)


def test_batches_are_dicts_of_numpy_arrays_without_the_validity_flags():
  it = iter(_pipe())
  batch = next(it)
  it.close()
  assert set(batch) == {"image", "caption", "id"}
  assert batch["image"].dtype == np.uint8 and batch["image"].shape == (4, 4, 4, 3)
  assert batch["caption"].shape == (4,) and batch["id"].shape == (4,)
  # Images stay with their captions through shuffling and batching.
  for image, caption in zip(batch["image"], batch["caption"]):
    assert caption == f"caption {image[0, 0, 0]}"


def test_each_epoch_is_a_seeded_shuffle_of_the_valid_records():
  source = ToySource()
  batches = list(_pipe(source, batch_size=2, num_epochs=2, drop_remainder=False))
  ids = [i for b in _ids(batches) for i in b]
  valid = sorted(f"r{i}" for i in range(N) if i not in BAD)
  epoch1, epoch2 = ids[:len(valid)], ids[len(valid):]
  assert sorted(epoch1) == valid and sorted(epoch2) == valid
  assert epoch1 != epoch2  # reshuffled per epoch
  assert epoch1 != sorted(epoch1, key=lambda s: int(s[1:]))  # actually shuffled
  again = [i for b in _ids(_pipe(batch_size=2, num_epochs=2, drop_remainder=False)) for i in b]
  assert again == ids  # same seed, same order
  other = [i for b in _ids(_pipe(batch_size=2, num_epochs=2, seed=8, drop_remainder=False))
           for i in b]
  assert other != ids
  # The invalid records were reported to the source, once per epoch they were met.
  assert sorted(source.failures) == sorted(["rec4: broken", "rec17: broken"] * 2)


def test_unshuffled_pipeline_keeps_source_order_and_drops_the_remainder():
  batches = list(_pipe(shuffle=False, num_epochs=1, batch_size=4))
  valid = [f"r{i}" for i in range(N) if i not in BAD]  # 28 valid -> 7 full batches
  assert _ids(batches) == [valid[k:k + 4] for k in range(0, 28, 4)]
  batches = list(_pipe(ToySource(bad=frozenset()), shuffle=False, num_epochs=1, batch_size=4))
  assert len(batches) == 7 and all(len(b["id"]) == 4 for b in batches)  # 30 = 7*4 + 2


@pytest.mark.parametrize("shard_count", [2, 3])
def test_process_shards_are_disjoint_and_cover_the_source(shard_count):
  clean = ToySource(bad=frozenset())
  shards = []
  for index in range(shard_count):
    batches = _pipe(clean, num_epochs=1, batch_size=1, drop_remainder=False,
                    shard_index=index, shard_count=shard_count)
    shards.append({i for b in _ids(batches) for i in b})
  for a in range(shard_count):
    for b in range(a + 1, shard_count):
      assert not shards[a] & shards[b]
  assert set().union(*shards) == {f"r{i}" for i in range(N)}
  assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_default_shard_is_this_jax_process():
  jax = pytest.importorskip("jax")
  assert (jax.process_index(), jax.process_count()) == (0, 1)
  batches = pipeline.make_pipeline(ToySource(bad=frozenset()), batch_size=5, seed=0,
                                   num_epochs=1, read_threads=0)
  assert sorted(i for b in _ids(batches) for i in b) == sorted(f"r{i}" for i in range(N))


def test_invalid_shard_arguments_are_refused():
  with pytest.raises(ValueError, match="shard_index 3"):
    _pipe(shard_index=3, shard_count=3)
  with pytest.raises(ValueError, match="batch_size"):
    _pipe(batch_size=0)


@pytest.mark.parametrize("n", [0, 3, 9])  # 9 batches of 4 cross the first epoch (28)
def test_restored_iterator_state_yields_exactly_the_uninterrupted_batches(n):
  total = 14
  uninterrupted = _take(iter(_pipe()), total)

  it = iter(_pipe())
  _take(it, n)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON, as in a checkpoint
  _take(it, 2)  # the original iterator moves on; the saved state must not
  it.close()

  resumed = iter(_pipe())  # a fresh pipeline, as after a restart
  resumed.set_state(state)
  rest = _take(resumed, total - n)
  resumed.close()
  assert _ids(rest) == _ids(uninterrupted[n:])
  for got, want in zip(rest, uninterrupted[n:]):
    np.testing.assert_array_equal(got["image"], want["image"])


def test_worker_processes_change_nothing_and_their_state_restores():
  # Batching and the invalid-record filter run after the workers, in this process, so the
  # batches do not depend on worker_count and failures are counted here.
  uninterrupted = _take(iter(_pipe()), 10)
  kw = dict(worker_count=2, worker_buffer_size=2)
  source = ToySource()
  it = iter(_pipe(source, **kw))
  first = _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  _take(it, 4)  # 32 records read: past both invalid ones
  it.close()
  assert sorted(set(source.failures)) == ["rec17: broken", "rec4: broken"]
  resumed = iter(_pipe(**kw))
  resumed.set_state(state)
  rest = _take(resumed, 6)
  resumed.close()
  assert _ids(first + rest) == _ids(uninterrupted)


def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  uninterrupted = _take(iter(_pipe()), 8)
  it = iter(_pipe())
  _take(it, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  it.close()

  resumed = iter(_pipe())
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert _ids(_take(resumed, 3)) == _ids(uninterrupted[5:])
  resumed.close()


def test_normalize_and_tokenize_hooks_apply_to_whole_batches():
  seen = []

  def tokenize(captions):
    seen.append(list(captions))
    return np.array([[len(c), 1] for c in captions], np.int32)

  it = iter(_pipe(normalize=True, tokenize=tokenize))
  batch = next(it)
  it.close()
  raw = np.stack([np.full((4, 4, 3), int(i[1:]), np.uint8) for i in batch["id"]])
  assert batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["image"], images.normalize(raw))
  assert seen[0] == batch["caption"].tolist()
  np.testing.assert_array_equal(batch["tokens"], [[len(c), 1] for c in batch["caption"]])


def test_element_transforms_run_before_batching():
  def add_flipped(record):
    return {**record, "flipped": record["image"][:, ::-1]}
  it = iter(_pipe(transforms=[add_flipped]))
  batch = next(it)
  it.close()
  np.testing.assert_array_equal(batch["flipped"], batch["image"][:, :, ::-1])


def test_make_source_builds_the_configured_source(tmp_path):
  from PIL import Image
  Image.new("RGB", (10, 10), (5, 6, 7)).save(tmp_path / "x.png")
  (tmp_path / "c.jsonl").write_text('{"image": "x.png", "caption": "dark"}\n')
  config = pipeline.default_config()
  config.path = str(tmp_path / "c.jsonl")
  config.image_size = 8
  source = pipeline.make_source(config)
  assert len(source) == 1 and source[0]["image"].shape == (8, 8, 3)
  config.prefetch_buffer_size = 0
  batches = list(pipeline.make_pipeline(source, batch_size=1, seed=0, num_epochs=3,
                                        shard_index=0, shard_count=1,
                                        **pipeline.pipeline_kwargs(config)))
  assert [b["caption"].tolist() for b in batches] == [["dark"]] * 3
  config.source = "parquet"
  with pytest.raises(ValueError, match="config.source='parquet'"):
    pipeline.make_source(config)


_PLAIN_SCRIPT = """
import numpy as np
from input_pipeline import pipeline

RECORDS = [{'image': np.full((2, 2, 3), i, np.uint8), 'caption': f'c{i}', 'id': f'r{i}'}
           for i in range(8)]

if __name__ == '__main__':
  it = iter(pipeline.make_pipeline(RECORDS, batch_size=4, seed=0, worker_count=1,
                                   read_threads=1, shard_index=0, shard_count=1))
  print('batch', sorted(next(it)['id'].tolist()))
  it.close()
"""


def test_worker_processes_start_from_a_script_that_never_parsed_absl_flags(tmp_path):
  # A library call outside main.py: nothing has run absl's app.run in that process.
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / "plain.py"
  script.write_text(_PLAIN_SCRIPT)
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "UnparsedFlagAccessError" not in out.stderr
  assert out.stdout.count("'r") == 4, out.stdout
