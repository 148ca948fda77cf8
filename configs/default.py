"""The embedded default world, end to end on CPU: the README's main command.

  python main.py --config=configs/default.py --workdir=/tmp/aesalign
  python main.py --config=configs/default.py:smoke --workdir=/tmp/aesalign_smoke

`smoke` shrinks every stage so the whole job runs in about a minute (used by the tests).
"""

from configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  unknown = set(args) - {'smoke'}
  if unknown:
    raise ValueError(f'configs/default.py: unknown config arg(s) {sorted(unknown)}; '
                     'expected "smoke"')
  c = common.add_world(common.base_config())
  c.model.preset = 'tiny'
  c.tokenizer.folder = None                 # train a BPE on the world's captions
  c.tokenizer.vocab_size = 1024
  # 24 tokens hold 95% of the world's captions whole, and the aesthetic words at their ends
  # (at 16, half of the captions that carry aesthetic words lost them to truncation, and the
  # rephrased queries lost theirs: rephrasing could not help).
  c.tokenizer.context_length = 24
  c.model.overrides.context_length = 24
  c.aesthetics.kind = 'iap'                 # an IAP head trained on the world's ratings
  c.rephrase.backend = 'lexicon'
  c.pretrain.steps = 800                    # 1,000 steps took the job past 10 minutes
  c.pretrain.batch_size = 128
  c.pretrain.optim.lr = 1e-3
  c.pretrain.optim.warmup_steps = 50
  c.pretrain.checkpoint_every = 200
  c.align.steps = 200
  c.align.batch_size = 64
  c.align.groups_per_step = 8
  c.align.log_every = 25
  c.align.checkpoint_every = 100
  c.mine.corpus_size = 20_000

  if args.get('smoke'):
    c.world.num_train = 2048
    c.world.num_eval = 512
    c.tokenizer.vocab_size = 512
    c.model.overrides.vision_layers = 2
    c.model.overrides.text_layers = 2
    c.pretrain.steps = 40
    c.pretrain.batch_size = 64
    c.pretrain.log_every = 10
    c.pretrain.checkpoint_every = 20
    c.align.steps = 20
    c.align.batch_size = 32
    c.align.groups_per_step = 4
    c.align.log_every = 10
    c.align.checkpoint_every = 10
    c.world_iap.num_train_images = 2000
    c.world_iap.num_test_images = 500
    c.world_iap.steps = 300
    c.mine.corpus_size = 2048
    c.mine.top_k = 100
    c.mine.max_queries = 60
  return c
