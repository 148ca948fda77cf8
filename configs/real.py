"""Real runs: align a pretrained CLIP (a Hugging Face folder) on TPU or GPU.

  python main.py --config=configs/real.py:model=vit_b16,mesh=tpu8 --workdir=/data/runs/b16
  python main.py --config=configs/real.py:model=vit_l14,mesh=slice,rephrase=hf ...

Arguments (comma-separated, all optional):
  model=    vit_b32 (default) | vit_b16 | vit_l14: which OpenAI CLIP checkpoint to start from;
  mesh=     gpu (default; data-parallel over the host's GPUs, one GPU included)
            | tpu8 (one 8-chip TPU host, v5litepod-8 or v6e-8: data 2 x fsdp 4; a v4-8 or
              v5p-8 host has 4 chips: add --config.mesh.data=1)
            | slice (a multi-host TPU slice such as v4-32 (16 chips) or v5litepod-32 (32
              chips): data -1 x fsdp 8);
  rephrase= hf (default on gpu: a local transformers LM) | openai (default on TPU: an
            OpenAI-compatible endpoint, e.g. vLLM serving an instruct model).

Every input is a path under /path/to/...: set them with flags (--config.model.hf_folder=...)
or edit a copy of this file. Missing inputs are refused by aesalign_jax/config_checks.py when
the run starts, each named by its key; get_config itself never touches the filesystem.
README "Real runs" walks through preparing each input.

What runs on these inputs (aesalign_jax/stages.py): pretrain fine-tunes the checkpoint on
the corpus of config.data (or, with --config.pretrain.steps=0, takes it as it is); mine embeds
that corpus with the pretrained model, rephrases the queries of mine.queries_path, retrieves,
scores the candidates with the LAION head on aesthetics.iap.clip_folder's ViT-L/14 embeddings
and writes D_po naming corpus ids; align trains on D_po with the corpus's images and pairs;
eval compares PT, PT+rephrase and aligned on COCO / Flickr30K retrieval, ImageNet zero-shot,
the top-k of the held-out queries of evals.topk_quality.queries_path over the corpus (IAP and
low-level aesthetics, diversity), an HPIR-format file if evals.hpir.path names one, and the
scorer judge (judge.kind=openai adds an LMM judge).
The fields below declare what a real run needs; shape_only() gives the config whose shapes
can be checked without any file (tests/test_real_configs.py).
"""

import ml_collections

from aesalign_jax.evaluation import hpir, retrieval_eval, topk_quality, zeroshot
from configs import common

MODELS = ('vit_b32', 'vit_b16', 'vit_l14')
MESHES = ('gpu', 'tpu8', 'slice')
VARIANTS = tuple(f'model={m},mesh={h}' for m in MODELS for h in MESHES)

# The OpenAI checkpoints as Hugging Face folders (openai/clip-vit-base-patch32, ...).
HF_FOLDERS = {'vit_b32': '/path/to/clip-vit-base-patch32',
              'vit_b16': '/path/to/clip-vit-base-patch16',
              'vit_l14': '/path/to/clip-vit-large-patch14'}

MESH_SHAPES = {'gpu': {'data': -1, 'fsdp': 1, 'tensor': 1},
               'tpu8': {'data': 2, 'fsdp': 4, 'tensor': 1},
               'slice': {'data': -1, 'fsdp': 8, 'tensor': 1}}

# (pretrain pairs, align pairs, align D_po groups of u*v = 25 images) per step, all devices
# together. gpu: one 80 GB H100 (benchmarks/gpu_step.py: ViT-B/16 bf16 fits 512 pairs + 16
# groups without remat, 1024 pairs does not); tpu8: 8 chips of 16-32 GB; slice: 32 chips.
# Every count divides by the devices the batch is split over (data x fsdp).
BATCHES = {
    ('gpu', 'vit_b32'): (1024, 512, 16), ('gpu', 'vit_b16'): (512, 512, 16),
    ('gpu', 'vit_l14'): (256, 256, 8),
    ('tpu8', 'vit_b32'): (2048, 1024, 32), ('tpu8', 'vit_b16'): (1024, 1024, 32),
    ('tpu8', 'vit_l14'): (512, 512, 16),
    ('slice', 'vit_b32'): (8192, 2048, 64), ('slice', 'vit_b16'): (4096, 2048, 64),
    ('slice', 'vit_l14'): (2048, 1024, 32),
}
# Rematerialise transformer blocks where the activations of these batches would not fit
# (ViT-L/14 everywhere; ViT-B/16 on 16 GB TPU chips such as v5e).
REMAT = {('gpu', 'vit_l14'), ('tpu8', 'vit_b16'), ('tpu8', 'vit_l14'), ('slice', 'vit_b16'),
         ('slice', 'vit_l14')}

# The LAION improved aesthetic predictor reads OpenAI ViT-L/14 image embeddings (768 wide).
IAP_WEIGHTS = '/path/to/iap_vit_l14.safetensors'
IAP_CLIP_FOLDER = HF_FOLDERS['vit_l14']


def _args(arg):
  args = common.parse_arg(arg)
  unknown = set(args) - {'model', 'mesh', 'rephrase'}
  if unknown:
    raise ValueError(f'configs/real.py: unknown config arg(s) {sorted(unknown)}; expected '
                     'model=, mesh=, rephrase=')
  model, mesh = args.get('model', 'vit_b32'), args.get('mesh', 'gpu')
  rephrase = args.get('rephrase', 'hf' if mesh == 'gpu' else 'openai')
  for key, value, allowed in (('model', model, MODELS), ('mesh', mesh, MESHES),
                              ('rephrase', rephrase, ('hf', 'openai'))):
    if value not in allowed:
      raise ValueError(f'configs/real.py: {key}={value!r}: expected one of {allowed}')
  return model, mesh, rephrase


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  model, mesh, rephrase = _args(arg)
  on_tpu = mesh != 'gpu'
  pretrain_batch, align_batch, groups = BATCHES[(mesh, model)]
  c = common.base_config()

  # The model and its tokenizer: a transformers CLIPModel folder (config.json,
  # model.safetensors, tokenizer files).
  c.model.preset = model                   # hf_folder's shapes; read only via shape_only()
  c.model.hf_folder = HF_FOLDERS[model]    # start from this checkpoint (its shapes, its weights)
  c.model.dtype = 'bfloat16'               # bf16 compute (MXU / tensor cores); fp32 parameters
  c.model.remat = (mesh, model) in REMAT   # trade compute for activation memory (see REMAT)
  c.tokenizer.folder = HF_FOLDERS[model]   # the checkpoint's own CLIP BPE tokenizer
  c.tokenizer.context_length = None        # 77, from the checkpoint's config.json

  c.mesh = MESH_SHAPES[mesh]               # devices per axis; -1 = the rest (see MESH_SHAPES)

  # The image-caption corpus: the pretrain / align contrastive pairs and the mining corpus.
  # JSON Lines {"image": "rel/path.jpg", "caption": "..."} (input_pipeline/sources.py); a
  # folder of images with .txt captions, a CSV, or a tfds set prepared as ArrayRecord
  # (data.source='tfds', data.tfds_name, data.caption_key) also work.
  c.data.source = 'jsonl'                  # not the embedded world
  c.data.path = '/path/to/corpus/captions.jsonl'  # one JSON object per image
  c.data.worker_count = 8                  # grain worker processes decoding JPEGs per host

  # Mining D_po.
  c.mine.queries_path = '/path/to/queries/mining.txt'  # one query a line (or .jsonl {"query"})
  c.mine.corpus_size = 0                   # the whole corpus
  c.retrieval.approx = on_tpu              # approximate top-K (approx_max_k) is fast on TPU

  # The aesthetic model: the LAION improved aesthetic predictor, converted to safetensors
  # (python -m aesalign_jax.aesthetics.convert_laion_weights; README "Real runs").
  c.aesthetics.kind = 'iap'                # an MLP on CLIP image embeddings, not pixel measures
  c.aesthetics.iap.weights = IAP_WEIGHTS   # sac+logos+ava1-l14-linearMSE.pth, converted
  # The CLIP whose image embeddings the head reads ('' = the model being aligned, right for
  # ViT-L/14 only, since the LAION head reads 768-wide ViT-L/14 embeddings).
  c.aesthetics.iap.clip_folder = '' if model == 'vit_l14' else IAP_CLIP_FOLDER

  # The rephraser (PAPER step 1).
  c.rephrase.backend = rephrase            # an LLM instead of the offline keyword lexicon
  if rephrase == 'hf':
    c.rephrase.model = '/path/to/instruct-llm'  # a transformers causal LM folder (1-8B instruct)
    c.rephrase.dtype = 'bfloat16'          # half the memory of fp32 weights
    if not on_tpu:
      c.rephrase.device = 'cuda'           # torch on the GPU (README: JAX's memory preallocation)
  else:
    c.rephrase.model = ''                  # REQUIRED: the model name the endpoint serves
    # base_url stays http://localhost:8000/v1 (vLLM's default); the key, if any, is read from
    # the environment variable named by rephrase.api_key_env (OPENAI_API_KEY).

  # Contrastive fine-tuning of the checkpoint on the corpus: the PT model of the report.
  c.pretrain.steps = 2000                  # a short domain adaptation (0: the checkpoint as is)
  c.pretrain.batch_size = pretrain_batch   # see BATCHES
  c.pretrain.optim.lr = 1e-5               # fine-tuning a pretrained CLIP, not 5e-4 from scratch
  c.pretrain.optim.warmup_steps = 200      # 10% of the steps
  c.pretrain.checkpoint_every = 250        # steps between checkpoints (preemptible TPUs)

  # Ranked-DPO alignment (u = v = 5 grids, beta 0.1, lambda 1: the defaults).
  c.align.steps = 2000                     # a few passes over D_po (one group per mining query)
  c.align.batch_size = align_batch         # contrastive pairs per step (see BATCHES)
  c.align.groups_per_step = groups         # D_po groups per step (see BATCHES)
  c.align.optim.lr = 1e-5                  # fine-tuning a pretrained CLIP (world model: 1e-4)
  c.align.optim.warmup_steps = 100         # 5% of the steps
  c.align.checkpoint_every = 250           # steps between checkpoints (preemptible TPUs)

  c.evals = _evals()                       # real benchmarks instead of the world's
  # The system-level judge: aesthetic scores of the two systems' top k (the IAP head); 'openai'
  # adds an LMM over an OpenAI-compatible endpoint (judge.base_url, judge.model). There is no
  # ground truth ('world') outside the embedded world.
  c.judge.kind = 'scorer'
  c.judge.aesthetic_margin = 0.05          # IAP scores span ~1-10: closer top-k means tie
  return c


def _evals() -> ml_collections.ConfigDict:
  """COCO / Flickr30K retrieval (Karpathy test splits as JSON Lines), ImageNet zero-shot (tfds),
  the top-k quality of held-out queries on the corpus, and an optional HPIR-format file."""
  e = ml_collections.ConfigDict()
  for name in ('coco', 'flickr30k'):
    r = retrieval_eval.default_config()
    r.source = 'data'                      # an image-caption file, not the world's split
    r.data.source = 'jsonl'                # written by python -m input_pipeline.prepare_karpathy
    r.data.path = f'/path/to/{name}/karpathy_test.jsonl'  # 5,000 / 1,000 test images
    r.data.root = f'/path/to/{name}/images'  # the --images folder the paths are relative to
    e[f'retrieval_{name}'] = r
  z = zeroshot.default_config(task='tfds')  # a tfds classification set, not the world
  z.tfds_name = 'imagenet2012'             # ImageNet-1k, prepared as ArrayRecord
  z.tfds_split = 'validation'              # the 50,000 validation images
  z.tfds_data_dir = '/path/to/tensorflow_datasets'  # where `tfds build` wrote it
  z.class_names = '/path/to/imagenet_classnames.txt'  # readable names (tfds has WordNet ids)
  z.templates = zeroshot.PHOTO_TEMPLATES   # prompts for natural photos
  e.zeroshot_imagenet = z
  t = topk_quality.default_config()
  # Held-out queries (none of mine.queries_path's), one a line or JSON Lines {"query": ...}.
  t.queries_path = '/path/to/queries/eval.txt'
  e.topk_quality = t
  h = hpir.default_config()
  h.path = ''                              # an HPIR-format .jsonl (README); '' = no HPIR numbers
  e.hpir = h
  for section in e.values():
    section.enabled = True                 # --config.evals.<name>.enabled=False skips it
  return e


def shape_only(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same config with model.hf_folder cleared, so its shapes come from model.preset (the
  published shapes of that checkpoint). For checks on a machine without the checkpoint (the
  tests): a run of this config would start from random weights, not from the checkpoint."""
  out = config.copy_and_resolve_references()
  out.model.hf_folder = ''
  return out
