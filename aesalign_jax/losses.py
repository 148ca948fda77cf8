"""Training losses: contrastive (CLIP InfoNCE, SigLIP) and ranked DPO computed listwise.

Pure jax functions (jit-able; no Flax). Every loss returns `(loss, aux)`, aux a dict of scalar
metrics with gradients stopped.

Temperature convention, shared by all losses: `logit_scale` / `temperature_scale` is the
MULTIPLIER 1 / tau, i.e. exp of the model's learned log-scale (what models.clip.CLIP returns,
and what transformers computes as `logit_scale.exp()`), never the log-scale itself.

Ranked DPO (PAPER.md, "The retrieval model as a policy" and "Ranked DPO, computed listwise"):
a group is one text query with N = u*v images in grid order; with s the policy's cosine
similarities and r the stored reference ones,
  delta_kl = scale * ((s_k - s_l) - (r_k - r_l))
for every pair (k preferred to l) of the group's pair mask, and the loss is the mean over ALL
valid pairs of the batch (a global mean, so a group weighs by its pair count, exactly like the
mean of the explicit pairwise losses).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
PAIR_RULES = ("product", "row", "column")


def _as_float(x):
  """At least float32 (bf16 embeddings are promoted; float64 stays float64 under x64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.result_type(x.dtype, jnp.float32))


def _static_number(name: str, value) -> float:
  """A Python number given as a loss hyper-parameter; these shape the loss and must be static."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"{name} must be a Python number (static under jit), got "
                    f"{type(value).__name__}") from e


def _l2_normalize(x, eps=1e-12):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _check_embeddings(img_emb, txt_emb):
  if img_emb.ndim != 2 or img_emb.shape != txt_emb.shape:
    raise ValueError(f"img_emb and txt_emb must both be [B, D], got {img_emb.shape} and "
                     f"{txt_emb.shape}")


# ------------------------------------------------------------------------------ contrastive

def clip_infonce(img_emb, txt_emb, logit_scale, label_smoothing: float = 0.0):
  """Symmetric CLIP InfoNCE over a batch of matching pairs (row b of each is one pair).

  img_emb, txt_emb: [B, D]; L2-normalised here (a no-op for the model's unit vectors).
  logit_scale: the multiplier 1/tau (already exponentiated), logits = logit_scale * cos.
  label_smoothing: eps in [0, 1); targets (1 - eps) * one_hot + eps / B, as torch's
    CrossEntropyLoss(label_smoothing) and optax.smooth_labels.
  Returns (loss, aux): loss = (CE(image -> texts) + CE(text -> images)) / 2, mean over the
  batch; aux i2t_loss, t2i_loss, i2t_accuracy, t2i_accuracy (top-1), logit_scale.
  """
  eps = _static_number("label_smoothing", label_smoothing)
  if not 0.0 <= eps < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  img, txt = _as_float(img_emb), _as_float(txt_emb)
  _check_embeddings(img, txt)
  logits = jnp.asarray(logit_scale, img.dtype) * (_l2_normalize(img) @ _l2_normalize(txt).T)

  def cross_entropy(lg):  # rows: queries; the matching key sits on the diagonal
    logp = jax.nn.log_softmax(lg, axis=-1)
    nll = -jnp.diagonal(logp)
    uniform = -jnp.mean(logp, axis=-1)
    return jnp.mean((1.0 - eps) * nll + eps * uniform)

  i2t, t2i = cross_entropy(logits), cross_entropy(logits.T)
  labels = jnp.arange(logits.shape[0])
  aux = dict(i2t_loss=i2t, t2i_loss=t2i,
             i2t_accuracy=jnp.mean(jnp.argmax(logits, axis=1) == labels),
             t2i_accuracy=jnp.mean(jnp.argmax(logits, axis=0) == labels),
             logit_scale=jnp.asarray(logit_scale, img.dtype))
  return 0.5 * (i2t + t2i), jax.lax.stop_gradient(aux)


def _shard_map(f, mesh, in_specs, out_specs):
  """jax.shard_map (jax >= 0.6) or its older experimental home, replication checking left on
  (the default): jax then knows the psum-ed loss is the same on every device, and the
  backward pass gives each device its own share of the gradient (all_gather transposes to a
  reduce-scatter); tests/test_contrastive_sharded.py checks it against the dense loss."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  return shard_map(f, mesh, in_specs, out_specs)


def clip_infonce_sharded(img_emb, txt_emb, logit_scale, *, mesh, batch_axes,
                         label_smoothing: float = 0.0, row_chunk: int = 0):
  """`clip_infonce` for a batch sharded over mesh axes, without a [B, B] matrix per device.

  Each device all-gathers both embeddings over `batch_axes` ([B, D] each: B * D floats, small
  next to B * B) and computes the logits of its OWN rows only, image -> all texts and text ->
  all images ([B / n, B] each); the per-row losses and top-1 hits are summed and psum-ed over
  the batch axes. Gradients: the transpose of all_gather is a reduce-scatter, so each row's
  embedding collects the gradient of every device's use of it, as in the dense loss.

  img_emb, txt_emb: [B, D] global arrays (called inside jit; their rows are resharded over
    `batch_axes` if they are laid out otherwise). B must be divisible by the devices on
    `batch_axes`.
  mesh: the jax.sharding.Mesh; batch_axes: the mesh axis names the batch is split over
    (e.g. ('data', 'fsdp')); other mesh axes see replicated work.
  label_smoothing: as `clip_infonce`.
  row_chunk: > 0 computes the local rows' logits in blocks of this many rows, each block
    rematerialised in the backward pass, so a device holds [row_chunk, B] logits at a time;
    0 = all local rows at once. Must divide B / n.
  Returns (loss, aux) with the values of `clip_infonce` (up to float summation order).
  """
  eps = _static_number("label_smoothing", label_smoothing)
  if not 0.0 <= eps < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  img, txt = _as_float(img_emb), _as_float(txt_emb)
  _check_embeddings(img, txt)
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  unknown = [a for a in axes if a not in mesh.shape]
  if not axes or unknown:
    raise ValueError(f"batch_axes {batch_axes!r} must name axes of the mesh {dict(mesh.shape)}")
  devices = int(np.prod([mesh.shape[a] for a in axes]))
  batch = img.shape[0]
  if batch % devices:
    raise ValueError(f"contrastive batch {batch} is not divisible by the {devices} devices on "
                     f"mesh axes {axes}")
  local_rows = batch // devices
  chunk = int(row_chunk) if row_chunk and 0 < row_chunk < local_rows else local_rows
  if local_rows % chunk:
    raise ValueError(f"row_chunk={row_chunk} does not divide the {local_rows} rows per device")
  scale = jnp.asarray(logit_scale, img.dtype)
  spec = jax.sharding.PartitionSpec(axes, None)
  replicated = jax.sharding.PartitionSpec()

  def per_device(img_local, txt_local, s):
    img_local, txt_local = _l2_normalize(img_local), _l2_normalize(txt_local)
    img_all = jax.lax.all_gather(img_local, axes, axis=0, tiled=True)   # [B, D]
    txt_all = jax.lax.all_gather(txt_local, axes, axis=0, tiled=True)
    first = jax.lax.axis_index(axes) * local_rows   # global index of this device's row 0

    def block(queries, keys, labels):   # summed smoothed CE and top-1 hits of query rows
      logits = s * (queries @ keys.T)   # [rows, B]; the scale after the product, as dense
      lse = jax.nn.logsumexp(logits, axis=-1)
      positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
      ce = (1.0 - eps) * (lse - positive) + eps * (lse - jnp.mean(logits, axis=-1))
      hits = jnp.sum((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))
      return jnp.sum(ce), hits

    def direction(queries, keys):
      labels = first + jnp.arange(local_rows)
      if chunk == local_rows:
        return block(queries, keys, labels)
      q = queries.reshape(local_rows // chunk, chunk, -1)
      lab = labels.reshape(local_rows // chunk, chunk)
      body = jax.checkpoint(lambda ql: block(ql[0], keys, ql[1]))
      ce, hits = jax.lax.map(body, (q, lab))
      return jnp.sum(ce), jnp.sum(hits)

    sums = jnp.stack(direction(img_local, txt_all) + direction(txt_local, img_all))
    return jax.lax.psum(sums, axes) / batch   # i2t loss, i2t acc, t2i loss, t2i acc

  sums = _shard_map(per_device, mesh, (spec, spec, replicated), replicated)(img, txt, scale)
  i2t, i2t_acc, t2i, t2i_acc = sums[0], sums[1], sums[2], sums[3]
  aux = dict(i2t_loss=i2t, t2i_loss=t2i, i2t_accuracy=i2t_acc, t2i_accuracy=t2i_acc,
             logit_scale=scale)
  return 0.5 * (i2t + t2i), jax.lax.stop_gradient(aux)


def siglip_loss(img_emb, txt_emb, logit_scale, logit_bias):
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) over a batch of matching pairs.

  logits = logit_scale * cos + logit_bias, with logit_scale the multiplier (exp of the learned
  log-scale; SigLIP initialises it to 10 and the bias to -10). Each of the B*B image-text
  pairs is a binary problem (match on the diagonal); the loss sums over texts and averages
  over images, as big_vision does. Returns (loss, aux).
  """
  img, txt = _as_float(img_emb), _as_float(txt_emb)
  _check_embeddings(img, txt)
  logits = (jnp.asarray(logit_scale, img.dtype) * (_l2_normalize(img) @ _l2_normalize(txt).T)
            + jnp.asarray(logit_bias, img.dtype))
  signs = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
  loss = jnp.mean(-jnp.sum(jax.nn.log_sigmoid(signs * logits), axis=-1))
  labels = jnp.arange(logits.shape[0])
  aux = dict(i2t_accuracy=jnp.mean(jnp.argmax(logits, axis=1) == labels),
             t2i_accuracy=jnp.mean(jnp.argmax(logits, axis=0) == labels),
             logit_scale=jnp.asarray(logit_scale, img.dtype),
             logit_bias=jnp.asarray(logit_bias, img.dtype))
  return loss, jax.lax.stop_gradient(aux)


# ------------------------------------------------------------------------------ ranked DPO

def validate_dpo_args(beta, loss_type: str, label_smoothing, *, prefix: str = "") -> None:
  """Refuses DPO settings that cannot work, naming the argument (`prefix` + name).

  beta > 0; loss_type in DPO_LOSS_TYPES; 0 <= label_smoothing < 0.5, and label smoothing
  only with the sigmoid loss (ipo and hinge have no smoothed form; silently ignoring it would
  hide a config mistake). Call it on the config before compiling anything.
  """
  b = _static_number(f"{prefix}beta", beta)
  eps = _static_number(f"{prefix}label_smoothing", label_smoothing)
  if not b > 0:  # also refuses NaN
    raise ValueError(f"{prefix}beta must be > 0, got {beta}")
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"{prefix}loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
  if not 0.0 <= eps < 0.5:
    raise ValueError(f"{prefix}label_smoothing must be in [0, 0.5), got {label_smoothing}")
  if eps > 0 and loss_type != "sigmoid":
    raise ValueError(f"{prefix}label_smoothing {label_smoothing} applies only to loss_type "
                     f"'sigmoid', not {loss_type!r}; set it to 0")


def preference_loss(delta, *, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0):
  """Elementwise DPO-family loss of the implicit reward margin `delta` (any shape).

  sigmoid: -[(1-eps) log sigmoid(beta*delta) + eps log sigmoid(-beta*delta)]  (cDPO)
  ipo:     (delta - 1/(2*beta))**2
  hinge:   relu(1 - beta*delta)
  """
  validate_dpo_args(beta, loss_type, label_smoothing)
  beta, eps = float(beta), float(label_smoothing)
  delta = _as_float(delta)
  if loss_type == "sigmoid":
    return (-(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
            - eps * jax.nn.log_sigmoid(-beta * delta))
  if loss_type == "ipo":
    return (delta - 1.0 / (2.0 * beta)) ** 2
  return jax.nn.relu(1.0 - beta * delta)


def _check_dpo_shapes(policy, ref, mask):
  if policy.ndim != 2:
    raise ValueError(f"policy_scores must be [G, N], got shape {policy.shape}")
  if ref.shape != policy.shape:
    raise ValueError(f"ref_scores must have policy_scores' shape {policy.shape}, got {ref.shape}")
  n = policy.shape[1]
  if mask.shape not in ((n, n), (policy.shape[0], n, n)):
    raise ValueError(f"pair_mask must be [N, N] or [G, N, N] with N = {n}, G = "
                     f"{policy.shape[0]}, got shape {mask.shape}")


def ranked_dpo(policy_scores, ref_scores, pair_mask, *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, temperature_scale):
  """Ranked DPO over a batch of groups, every preference pair of a group from one score vector.

  policy_scores: [G, N] cosine similarities s(t_g, x_gk) of each group's query to its images.
  ref_scores: [G, N] the reference model's similarities (stored at mining time, or from an
    online frozen reference); no gradient flows into them.
  pair_mask: bool [N, N] (one grid for all groups) or [G, N, N]; mask[g, k, l] is True when
    image k is preferred to image l. Padding groups: all False.
  beta, loss_type, label_smoothing: see `preference_loss`; checked by `validate_dpo_args`.
  temperature_scale: 1/tau, the multiplier (exp of the learned log-scale), scalar. Gradients
    flow through it if it is traced; pass jax.lax.stop_gradient(scale) or a constant to keep
    the preference loss from moving the contrastive temperature.
  Returns (loss, aux): loss = mean of the per-pair losses over all valid pairs of the batch
  (0 when there are none); aux as TRL's DPOTrainer, pair-weighted:
    rewards/chosen    mean over pairs of beta * scale * (s_k - r_k), k the preferred image
    rewards/rejected  the same for the other image l
    rewards/margins   chosen - rejected (= mean of beta * delta)
    rewards/accuracies  fraction of pairs with delta > 0
    num_pairs         valid pairs in the batch.
  """
  validate_dpo_args(beta, loss_type, label_smoothing)
  policy = _as_float(policy_scores)
  ref = jax.lax.stop_gradient(_as_float(ref_scores).astype(policy.dtype))
  mask = jnp.asarray(pair_mask)
  _check_dpo_shapes(policy, ref, mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"pair_mask must be bool, got {mask.dtype}")
  if isinstance(temperature_scale, (int, float)) and not temperature_scale > 0:
    raise ValueError(f"temperature_scale must be > 0 (it is 1/tau), got {temperature_scale}")
  scale = jnp.asarray(temperature_scale, policy.dtype)

  # delta_kl = scale * ((s_k - r_k) - (s_l - r_l)): the same quantity as PAPER.md's
  # (s_k - s_l) - (r_k - r_l), from one [G, N] vector instead of two [G, N, N] ones.
  gain = scale * (policy - ref)
  delta = gain[:, :, None] - gain[:, None, :]
  mask = jnp.broadcast_to(mask, delta.shape)
  weight = mask.astype(policy.dtype)
  num_pairs = jnp.sum(weight)
  denom = jnp.maximum(num_pairs, 1.0)
  per_pair = preference_loss(delta, beta=beta, loss_type=loss_type,
                             label_smoothing=label_smoothing)
  loss = jnp.sum(jnp.where(mask, per_pair, 0.0)) / denom

  reward = float(beta) * gain  # [G, N]; TRL's beta * (log pi - log pi_ref) up to log Z
  chosen = jnp.sum(reward * jnp.sum(weight, axis=2)) / denom  # k counted once per pair it wins
  rejected = jnp.sum(reward * jnp.sum(weight, axis=1)) / denom
  aux = {
      "rewards/chosen": chosen,
      "rewards/rejected": rejected,
      "rewards/margins": chosen - rejected,
      "rewards/accuracies": jnp.sum(jnp.where(mask & (delta > 0), 1.0, 0.0)) / denom,
      "num_pairs": num_pairs,
  }
  return loss, jax.lax.stop_gradient(aux)


def pairwise_dpo_reference(policy_scores, ref_scores, pair_mask, *, beta: float,
                           loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                           temperature_scale):
  """Ranked DPO the way a pairwise trainer sees it: an explicit list of (group, chosen,
  rejected) pairs, one scalar loss per pair, then their mean. The per-pair formulas are
  written out independently of `preference_loss`. For tests and benchmarks; `pair_mask` must
  be concrete (numpy). Same arguments and (loss, aux) as `ranked_dpo`.
  """
  validate_dpo_args(beta, loss_type, label_smoothing)
  s, r = _as_float(policy_scores), _as_float(ref_scores)
  mask = np.broadcast_to(np.asarray(pair_mask, bool), (s.shape[0],) + np.shape(pair_mask)[-2:])
  g, k, l = np.nonzero(mask)  # one row per pair
  beta, eps = float(beta), float(label_smoothing)
  delta = temperature_scale * ((s[g, k] - s[g, l]) - (r[g, k] - r[g, l]))
  if loss_type == "sigmoid":
    pair_losses = (-(1 - eps) * jnp.log(jax.nn.sigmoid(beta * delta))
                   - eps * jnp.log(jax.nn.sigmoid(-beta * delta)))
  elif loss_type == "ipo":
    pair_losses = (delta - 1 / (2 * beta)) ** 2
  else:
    pair_losses = jnp.maximum(0.0, 1 - beta * delta)
  chosen = beta * temperature_scale * (s[g, k] - r[g, k])
  rejected = beta * temperature_scale * (s[g, l] - r[g, l])
  if len(g) == 0:
    zero = jnp.zeros((), s.dtype)
    return zero, {"rewards/chosen": zero, "rewards/rejected": zero, "rewards/margins": zero,
                  "rewards/accuracies": zero, "num_pairs": zero}
  aux = {"rewards/chosen": jnp.mean(chosen), "rewards/rejected": jnp.mean(rejected),
         "rewards/margins": jnp.mean(chosen - rejected),
         "rewards/accuracies": jnp.mean((delta > 0).astype(s.dtype)),
         "num_pairs": jnp.asarray(len(g), s.dtype)}
  return jnp.mean(pair_losses), aux


# ------------------------------------------------------------------------------ pair masks

def pair_mask(u: int, v: int, rule: str = "product") -> np.ndarray:
  """The preference pairs of a u x v grid group, bool [N, N] with N = u*v.

  Images are in grid order: index k = i*v + j, row i = semantic rank, column j = aesthetic
  rank (0 = best). mask[k, l] is True when image k is preferred to image l:
    product: i <= i' and j <= j', not the same image   u(u+1)/2 * v(v+1)/2 - u*v pairs
    row:     same row, j < j' (aesthetics only)         u * v(v-1)/2 pairs
    column:  same column, i < i' (semantics only)       v * u(u-1)/2 pairs
  """
  for name, value in (("u", u), ("v", v)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if rule not in PAIR_RULES:
    raise ValueError(f"rule must be one of {PAIR_RULES}, got {rule!r}")
  i, j = np.divmod(np.arange(u * v), v)
  same_i, same_j = i[:, None] == i[None, :], j[:, None] == j[None, :]
  before_i, before_j = i[:, None] < i[None, :], j[:, None] < j[None, :]
  if rule == "row":
    return same_i & before_j
  if rule == "column":
    return same_j & before_i
  return (before_i | same_i) & (before_j | same_j) & ~(same_i & same_j)
