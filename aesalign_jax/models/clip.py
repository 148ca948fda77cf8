"""The OpenAI / Hugging Face CLIP architecture in Flax NNX.

Vision tower: patch embedding (a conv without bias, done as a matmul over flattened patches),
class token, learned positions, pre-LN, pre-LN transformer blocks, post-LN on the class token,
projection. Text tower: token and position embeddings, causal pre-LN blocks, final LN, pooled at
the end-of-text token, projection. A learned logit scale (stored as its log, like transformers).

Parameters are fp32; `ClipConfig.dtype` sets the compute dtype (bf16 on accelerators). Every
parameter carries `logical_axes` metadata that aesalign_jax.sharding maps to mesh axes.
Images are NHWC float32, already normalised with the CLIP mean and std.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from aesalign_jax import sharding


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Shapes and numerics of a CLIP model (field names follow the open_clip vocabulary)."""
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp: int = 3072
  vision_act: str = 'quick_gelu'
  vocab_size: int = 49408
  context_length: int = 77
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp: int = 2048
  text_act: str = 'quick_gelu'
  embed_dim: int = 512
  layer_norm_eps: float = 1e-5
  logit_scale_init: float = math.log(1 / 0.07)
  # A learned logit bias (SigLIP's sigmoid loss needs one; CLIP has none): None = no bias.
  logit_bias_init: Optional[float] = None
  eos_token_id: int = 49407
  dtype: str = 'float32'      # compute dtype; parameters always fp32
  remat: bool = False         # rematerialise each transformer block in the backward pass
  # 'einsum': plain XLA ops (compiles fastest on CPU); 'fused': jax.nn.dot_product_attention
  # with its default implementation (in jax 0.10 XLA's own, not cuDNN: see
  # benchmarks/gpu_step.py's 'cudnn' variant); 'auto': fused on GPU, einsum elsewhere.
  attention: str = 'auto'
  # 'patch': one stride-p convolution (CLIP's; the transformers layout). 'conv': a hybrid ViT
  # whose tokens come from log2(p) 3x3 stride-2 convolutions (Xiao et al. 2021, "Early
  # convolutions help transformers see better"), then the same linear map into the width.
  vision_stem: str = 'patch'

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f'model.image_size={self.image_size} is not a multiple of '
                       f'model.patch_size={self.patch_size}')
    for tower in ('vision', 'text'):
      width, heads = getattr(self, f'{tower}_width'), getattr(self, f'{tower}_heads')
      if width % heads:
        raise ValueError(f'model.{tower}_width={width} is not divisible by '
                         f'model.{tower}_heads={heads}')
      act = getattr(self, f'{tower}_act')
      if act not in ACTIVATIONS:
        raise ValueError(f'model.{tower}_act={act!r}: expected one of {sorted(ACTIVATIONS)}')
    if self.vision_stem not in ('patch', 'conv'):
      raise ValueError(f'model.vision_stem={self.vision_stem!r}: expected patch or conv')
    if self.vision_stem == 'conv' and self.patch_size & (self.patch_size - 1):
      raise ValueError(f'model.vision_stem=conv needs a power-of-two model.patch_size, got '
                       f'{self.patch_size}')
    if self.attention not in ('auto', 'einsum', 'fused'):
      raise ValueError(f'model.attention={self.attention!r}: expected auto, einsum or fused')
    if self.dtype not in ('float32', 'bfloat16', 'float16'):
      raise ValueError(f'model.dtype={self.dtype!r}: expected float32, bfloat16 or float16')

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def stem_channels(self) -> tuple[int, ...]:
    """Output channels of the conv stem's stride-2 layers (empty for the patch stem)."""
    if self.vision_stem == 'patch':
      return ()
    n = self.patch_size.bit_length() - 1
    return tuple(max(self.vision_width >> (n - 1 - i), 16) for i in range(n))


# Published shapes (OpenAI CLIP). `tiny` is sized for the embedded world on 2 CPU cores.
PRESETS = {
    'tiny': dict(image_size=32, patch_size=8, vision_width=128, vision_layers=4,
                 vision_heads=4, vision_mlp=512, vocab_size=1024, context_length=16,
                 text_width=128, text_layers=4, text_heads=4, text_mlp=512, embed_dim=128,
                 eos_token_id=1023),   # the trained BPE puts its two special tokens last
    'vit_b32': dict(patch_size=32),
    'vit_b16': dict(patch_size=16),
    'vit_l14': dict(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                    vision_mlp=4096, text_width=768, text_layers=12, text_heads=12,
                    text_mlp=3072, embed_dim=768),
}


def preset(name: str, **overrides) -> ClipConfig:
  """A ClipConfig from a preset name ('tiny', 'vit_b32', 'vit_b16', 'vit_l14') plus overrides."""
  if name not in PRESETS:
    raise ValueError(f'model.preset={name!r}: expected one of {sorted(PRESETS)}')
  return ClipConfig(**{**PRESETS[name], **overrides})


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    'quick_gelu': quick_gelu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),   # transformers' "gelu" is exact erf
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
}


def _param(rngs: nnx.Rngs, shape, std: float, axes) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   logical_axes=axes)


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out] in fp32, applied in the compute dtype."""

  def __init__(self, din: int, dout: int, axes, *, rngs: nnx.Rngs, use_bias=True,
               std: Optional[float] = None, dtype=jnp.float32):
    self.kernel = _param(rngs, (din, dout), std or din ** -0.5, axes)
    self.bias = nnx.Param(jnp.zeros((dout,)), logical_axes=axes[1:]) if use_bias else None
    self.dtype = dtype

  def __call__(self, x):
    # As a 2-D matmul over all leading dims: XLA's CPU backward of a [B, T, W] x [W, O] dot
    # was 1.6x slower than the same dot on [B*T, W].
    lead = x.shape[:-1]
    y = x.reshape(-1, x.shape[-1]).astype(self.dtype) @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y.reshape(lead + (y.shape[-1],))


class LayerNorm(nnx.Module):
  """LayerNorm computed in fp32 whatever the compute dtype (bf16 statistics lose accuracy)."""

  def __init__(self, dim: int, eps: float, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,)), logical_axes=('norm',))
    self.bias = nnx.Param(jnp.zeros((dim,)), logical_axes=('norm',))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


def einsum_attention(q, k, v, causal: bool):
  """Softmax attention over [B, T, H, D] in plain XLA ops; softmax in fp32.

  Heads are moved ahead of time ([B, H, T, D]) so both products are plain batched matmuls:
  on CPU that compiled to a backward about 2x faster than the 4-D einsums.
  """
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  logits = (q @ k.swapaxes(-1, -2)).astype(jnp.float32) * q.shape[-1] ** -0.5
  if causal:
    t = q.shape[2]
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return (weights @ v).transpose(0, 2, 1, 3)


def _use_fused(attention: str) -> bool:
  return attention == 'fused' or (attention == 'auto' and jax.default_backend() == 'gpu')


class Attention(nnx.Module):
  """Multi-head self-attention with q, k, v and out projections (all with biases, as CLIP)."""

  def __init__(self, width: int, heads: int, *, rngs, dtype, attention='auto'):
    self.heads = heads
    self.fused = _use_fused(attention)
    self.q = Dense(width, width, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.k = Dense(width, width, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.v = Dense(width, width, ('embed', 'heads'), rngs=rngs, dtype=dtype)
    self.out = Dense(width, width, ('heads', 'embed'), rngs=rngs, dtype=dtype)

  def __call__(self, x, causal: bool):
    b, t, w = x.shape
    split = lambda y: y.reshape(b, t, self.heads, w // self.heads)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    if self.fused:   # jax.nn.dot_product_attention (XLA's by default); softmax in fp32
      y = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    else:            # on CPU the plain ops compile about 2x faster than the generic kernel
      y = einsum_attention(q, k, v, causal)
    return self.out(y.reshape(b, t, w))


class Block(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  def __init__(self, width, heads, mlp, act, eps, *, rngs, dtype, attention):
    self.ln1 = LayerNorm(width, eps, dtype)
    self.attn = Attention(width, heads, rngs=rngs, dtype=dtype, attention=attention)
    self.ln2 = LayerNorm(width, eps, dtype)
    self.fc1 = Dense(width, mlp, ('embed', 'mlp'), rngs=rngs, dtype=dtype)
    self.fc2 = Dense(mlp, width, ('mlp', 'embed'), rngs=rngs, dtype=dtype)
    self.act = act

  def __call__(self, x, causal: bool):
    x = x + self.attn(self.ln1(x), causal)
    x = x + self.fc2(ACTIVATIONS[self.act](self.fc1(self.ln2(x))))
    return sharding.constrain(x, ('batch', 'length', 'act_embed'))


class Transformer(nnx.Module):

  def __init__(self, width, layers, heads, mlp, act, eps, *, rngs, dtype, remat, attention):
    self.blocks = nnx.List([Block(width, heads, mlp, act, eps, rngs=rngs, dtype=dtype,
                                  attention=attention) for _ in range(layers)])
    self.remat = remat

  def __call__(self, x, causal: bool):
    for block in self.blocks:
      if self.remat:
        x = nnx.remat(lambda blk, y: blk(y, causal))(block, x)
      else:
        x = block(x, causal)
    return x


class ConvLayer(nnx.Module):
  """3x3 stride-2 convolution, LayerNorm over channels, GELU: one step of the conv stem."""

  def __init__(self, cin: int, cout: int, *, rngs, dtype):
    self.kernel = _param(rngs, (3, 3, cin, cout), (9 * cin) ** -0.5, (None, None, None, None))
    self.norm = LayerNorm(cout, 1e-5, dtype)
    self.dtype = dtype

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.nn.gelu(self.norm(y))


class VisionTower(nnx.Module):

  def __init__(self, cfg: ClipConfig, *, rngs, dtype):
    w, p = cfg.vision_width, cfg.patch_size
    self.patch_size = p
    channels = (3,) + cfg.stem_channels
    self.stem = nnx.List([ConvLayer(cin, cout, rngs=rngs, dtype=dtype)
                          for cin, cout in zip(channels[:-1], channels[1:])])
    k = 1 if cfg.stem_channels else p    # after the stem, each pixel is a patch
    self.patch_embed = _param(rngs, (k, k, channels[-1], w), (channels[-1] * k * k) ** -0.5,
                              (None, None, None, 'embed'))
    self.class_embedding = _param(rngs, (w,), w ** -0.5, ('embed',))
    self.pos_embedding = _param(rngs, (cfg.num_patches + 1, w), 0.02, (None, 'embed'))
    self.pre_ln = LayerNorm(w, cfg.layer_norm_eps, dtype)
    self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp,
                                   cfg.vision_act, cfg.layer_norm_eps, rngs=rngs, dtype=dtype,
                                   remat=cfg.remat, attention=cfg.attention)
    self.post_ln = LayerNorm(w, cfg.layer_norm_eps, dtype)
    self.proj = Dense(w, cfg.embed_dim, ('embed', 'proj'), rngs=rngs, use_bias=False,
                      dtype=dtype)
    self.dtype = dtype

  def __call__(self, images):
    for layer in self.stem:
      images = layer(images)
    b, h, w, c = images.shape
    p = self.patch_embed.shape[0]
    # A stride-p conv without bias is a matmul over flattened (row, col, channel) patches.
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // p) * (w // p), p * p * c)
    kernel = self.patch_embed[...].reshape(p * p * c, -1)
    x = patches.astype(self.dtype) @ kernel.astype(self.dtype)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(self.dtype)
    x = sharding.constrain(self.pre_ln(x), ('batch', 'length', 'act_embed'))
    x = self.transformer(x, causal=False)
    return self.proj(self.post_ln(x[:, 0]))


class TextTower(nnx.Module):

  def __init__(self, cfg: ClipConfig, *, rngs, dtype):
    w = cfg.text_width
    self.token_embedding = _param(rngs, (cfg.vocab_size, w), 0.02, ('vocab', 'embed'))
    self.pos_embedding = _param(rngs, (cfg.context_length, w), 0.01, (None, 'embed'))
    self.transformer = Transformer(w, cfg.text_layers, cfg.text_heads, cfg.text_mlp,
                                   cfg.text_act, cfg.layer_norm_eps, rngs=rngs, dtype=dtype,
                                   remat=cfg.remat, attention=cfg.attention)
    self.final_ln = LayerNorm(w, cfg.layer_norm_eps, dtype)
    self.proj = Dense(w, cfg.embed_dim, ('embed', 'proj'), rngs=rngs, use_bias=False,
                      dtype=dtype)
    self.dtype = dtype

  def __call__(self, ids, eos_index):
    t = ids.shape[1]
    x = jnp.take(self.token_embedding[...], ids, axis=0) + self.pos_embedding[:t]
    x = sharding.constrain(x.astype(self.dtype), ('batch', 'length', 'act_embed'))
    # Causal attention only: positions after the end token (padding) never reach the pooled
    # token, so no padding mask is needed for the embedding.
    x = self.final_ln(self.transformer(x, causal=True))
    pooled = jnp.take_along_axis(x, eos_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return self.proj(pooled)


def l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))


class CLIP(nnx.Module):
  """Two towers and a learned logit scale; embeddings come back L2-normalised in fp32."""

  def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.config = cfg
    self.vision = VisionTower(cfg, rngs=rngs, dtype=dtype)
    self.text = TextTower(cfg, rngs=rngs, dtype=dtype)
    self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32),
                                 logical_axes=())
    self.logit_bias = (None if cfg.logit_bias_init is None else
                       nnx.Param(jnp.asarray(cfg.logit_bias_init, jnp.float32), logical_axes=()))

  def encode_image(self, images):
    """images: float [B, H, W, 3], CLIP-normalised -> unit vectors [B, embed_dim]."""
    return l2_normalize(self.vision(images))

  def encode_text(self, ids, eos_index):
    """ids: int [B, L]; eos_index: int [B], the end-token position -> unit vectors."""
    return l2_normalize(self.text(ids, eos_index))

  def __call__(self, images, ids, eos_index):
    """Returns (image embeddings, text embeddings, logit scale = exp(log-scale))."""
    return (self.encode_image(images), self.encode_text(ids, eos_index),
            jnp.exp(self.logit_scale[...]))


def eos_positions(ids, eos_token_id: int):
  """The pooling index transformers uses: first end token (argmax of ids for legacy id 2)."""
  ids = jnp.asarray(ids)
  if eos_token_id == 2:
    # transformers' legacy rule for old configs: the end token is the highest id in the row.
    return jnp.argmax(ids, axis=-1).astype(jnp.int32)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


# SigLIP's initialisation (Zhai et al. 2023): logit scale 10 and bias -10, so that the many
# negative pairs start with a small loss instead of swamping the few positives.
SIGLIP_LOGIT_SCALE_INIT, SIGLIP_LOGIT_BIAS_INIT = math.log(10.0), -10.0


def with_siglip_bias(cfg: ClipConfig, params: Optional[dict] = None):
  """(cfg, params) with a learned logit bias for SigLIP: a model without one gets SigLIP's
  initial bias and, unless `params` (a trained model) already fix the scale, its initial
  scale. A model that has a bias is returned unchanged."""
  if cfg.logit_bias_init is not None:
    return cfg, params
  if params is None:
    return dataclasses.replace(cfg, logit_scale_init=SIGLIP_LOGIT_SCALE_INIT,
                               logit_bias_init=SIGLIP_LOGIT_BIAS_INIT), None
  cfg = dataclasses.replace(cfg, logit_bias_init=SIGLIP_LOGIT_BIAS_INIT)
  return cfg, {**params, 'logit_bias': jnp.asarray(SIGLIP_LOGIT_BIAS_INIT, jnp.float32)}


def create(cfg: ClipConfig, seed: int = 0) -> CLIP:
  """A randomly initialised CLIP."""
  return CLIP(cfg, rngs=nnx.Rngs(seed))


def _pure(state) -> dict:
  # flax is moving from nnx.State to plain dicts; support both spellings.
  return nnx.to_pure_dict(state) if hasattr(nnx, 'to_pure_dict') else state.to_pure_dict()


# Functional view: parameters as a plain nested dict (what optax, orbax and the Hugging Face
# converter see), bound to a model object inside jitted functions.

@functools.lru_cache(maxsize=16)
def _skeleton(cfg: ClipConfig):
  abstract = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def init_params(cfg: ClipConfig, seed: int = 0) -> dict:
  """Random parameters as a nested dict of fp32 arrays.

  Eager, not jitted: XLA took minutes to compile the whole random init of ViT-B/16 on a GPU.
  """
  return _pure(nnx.state(create(cfg, seed), nnx.Param))


def abstract_params(cfg: ClipConfig) -> dict:
  """ShapeDtypeStructs of the parameters, computed without allocating them."""
  return _pure(_skeleton(cfg)[1])


def logical_axes(cfg: ClipConfig) -> dict:
  """The logical axis names of every parameter, in the structure of init_params."""
  state = _skeleton(cfg)[1]
  return _pure(jax.tree.map(lambda v: tuple(v.get_metadata()['logical_axes']), state,
                            is_leaf=lambda v: isinstance(v, nnx.Variable)))


def bind(cfg: ClipConfig, params: dict) -> CLIP:
  """A CLIP module holding `params` (arrays or tracers); cheap, for use inside jit."""
  graphdef, abstract = _skeleton(cfg)
  state = jax.tree.map(lambda x: x, abstract)   # fresh Variables; the cache stays abstract
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)
