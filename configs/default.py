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
  c = common.base_config()
  c.model.preset = 'tiny'
  c.tokenizer.folder = None                 # train a BPE on the world's captions
  c.tokenizer.vocab_size = 1024
  c.tokenizer.context_length = 16
  c.data.source = 'world'

  if args.get('smoke'):
    c.world.num_train = 2048
    c.world.num_eval = 512
    c.tokenizer.vocab_size = 512
    c.model.overrides.vision_layers = 2
    c.model.overrides.text_layers = 2
  return c
