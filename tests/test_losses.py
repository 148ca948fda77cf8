"""Losses: CLIP InfoNCE and SigLIP against numpy references and closed forms; ranked DPO
computed listwise equals the mean of explicit pairwise DPO losses; pair masks of the grid."""

import itertools
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aesalign_jax import losses, train
from aesalign_jax.losses import (clip_infonce, pair_mask, pairwise_dpo_reference,
                                 preference_loss, ranked_dpo, siglip_loss)


@pytest.fixture
def x64():
  """float64 for the tests that compare two computations of one quantity at 1e-6 or tighter."""
  with jax.enable_x64(True):
    yield


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------ pair masks

@pytest.mark.parametrize("u,v", [(1, 1), (1, 4), (3, 1), (2, 3), (3, 3), (5, 5), (4, 6)])
def test_pair_counts_follow_the_closed_forms(u, v):
  assert pair_mask(u, v, "product").sum() == u * (u + 1) // 2 * v * (v + 1) // 2 - u * v
  assert pair_mask(u, v, "row").sum() == u * v * (v - 1) // 2
  assert pair_mask(u, v, "column").sum() == v * u * (u - 1) // 2


def test_product_mask_is_the_grid_partial_order():
  u, v = 3, 4
  mask = pair_mask(u, v, "product")
  assert mask.shape == (12, 12) and mask.dtype == bool
  for k in range(u * v):
    for l in range(u * v):
      (i, j), (i2, j2) = divmod(k, v), divmod(l, v)
      assert mask[k, l] == (i <= i2 and j <= j2 and (i, j) != (i2, j2)), (k, l)
  # A strict partial order: irreflexive, antisymmetric, transitive.
  assert not mask.diagonal().any() and not (mask & mask.T).any()
  m = mask.astype(int)
  assert ((m @ m > 0) <= mask).all()


def test_row_and_column_masks_are_the_single_axis_parts_of_product():
  u, v = 3, 4
  row, col, product = (pair_mask(u, v, r) for r in ("row", "column", "product"))
  # Row pairs: same semantic rank, k aesthetically better (image 0 = (0,0) beats (0,3)).
  assert row[0, 3] and not row[3, 0] and not row[0, v]
  assert col[0, v] and not col[v, 0] and not col[0, 1]
  assert not (row & col).any() and (row <= product).all() and (col <= product).all()
  assert (product & ~row & ~col).any()  # diagonal moves belong to product only


@pytest.mark.parametrize("args,name", [((0, 3, "product"), "u"), ((3, -1, "row"), "v"),
                                       ((2.0, 3, "row"), "u"), ((2, 3, "diagonal"), "rule")])
def test_pair_mask_refuses_bad_arguments_by_name(args, name):
  with pytest.raises(ValueError, match=rf"^{name} must"):
    pair_mask(*args)


# ------------------------------------------------------------------------------ ranked DPO

def _groups(seed, g, n, spread=0.2):
  rng = np.random.default_rng(seed)
  ref = rng.uniform(-0.2, 0.6, size=(g, n))
  policy = ref + rng.normal(scale=spread, size=(g, n))
  return policy, ref


DPO_SETTINGS = [dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0),
                dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.2),
                dict(loss_type="ipo", beta=0.3, label_smoothing=0.0),
                dict(loss_type="hinge", beta=0.2, label_smoothing=0.0)]


@pytest.mark.parametrize("rule,u,v,settings", [
    ("product", 3, 3, DPO_SETTINGS[0]), ("row", 2, 4, DPO_SETTINGS[1]),
    ("column", 4, 2, DPO_SETTINGS[2]), ("product", 2, 3, DPO_SETTINGS[3])],
    ids=lambda x: x["loss_type"] if isinstance(x, dict) else str(x))
def test_listwise_equals_mean_of_explicit_pairwise_losses(x64, rule, u, v, settings):
  policy, ref = _groups(0, 3, u * v)
  mask = pair_mask(u, v, rule)
  kw = dict(settings, temperature_scale=12.5)
  listwise = jax.jit(jax.value_and_grad(lambda p: ranked_dpo(p, ref, mask, **kw), has_aux=True))
  pairwise = jax.jit(jax.value_and_grad(
      lambda p: pairwise_dpo_reference(p, ref, mask, **kw), has_aux=True))
  (loss, aux), grad = listwise(jnp.asarray(policy))
  (ref_loss, ref_aux), ref_grad = pairwise(jnp.asarray(policy))
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-12)
  np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-12)
  assert np.abs(ref_grad).max() > 1e-3  # the comparison is not between two zero gradients
  for key in ref_aux:
    np.testing.assert_allclose(aux[key], ref_aux[key], rtol=0, atol=1e-12, err_msg=key)


def _python_loop_dpo(policy, ref, mask, *, beta, loss_type, label_smoothing, scale):
  """Loss and d loss / d policy pair by pair with `math` and hand-derived derivatives: a
  reference free of jax and of autodiff."""
  sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
  eps, total, count = label_smoothing, 0.0, 0
  grad = np.zeros_like(policy)
  for g, k, l in itertools.product(*map(range, mask.shape)):
    if not mask[g, k, l]:
      continue
    d = scale * ((policy[g, k] - policy[g, l]) - (ref[g, k] - ref[g, l]))
    if loss_type == "sigmoid":
      loss = -(1 - eps) * math.log(sig(beta * d)) - eps * math.log(sig(-beta * d))
      dloss = -(1 - eps) * beta * sig(-beta * d) + eps * beta * sig(beta * d)
    elif loss_type == "ipo":
      loss, dloss = (d - 1 / (2 * beta)) ** 2, 2 * (d - 1 / (2 * beta))
    else:
      loss, dloss = max(0.0, 1 - beta * d), (-beta if 1 - beta * d > 0 else 0.0)
    total, count = total + loss, count + 1
    grad[g, k] += dloss * scale
    grad[g, l] -= dloss * scale
  return total / count, grad / count


@pytest.mark.parametrize("settings", DPO_SETTINGS, ids=lambda s: f"{s['loss_type']}-{s['beta']}")
def test_listwise_equals_a_hand_differentiated_python_loop_over_pairs(x64, settings):
  policy, ref = _groups(13, 3, 9, spread=0.3)
  mask = np.stack([pair_mask(3, 3, "product"), pair_mask(3, 3, "row"), pair_mask(3, 3, "column")])
  (loss, _), grad = jax.jit(jax.value_and_grad(
      lambda p: ranked_dpo(p, ref, mask, temperature_scale=7.0, **settings), has_aux=True))(
          jnp.asarray(policy))
  expected_loss, expected_grad = _python_loop_dpo(policy, ref, mask, scale=7.0, **settings)
  np.testing.assert_allclose(loss, expected_loss, rtol=0, atol=1e-12)
  np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=1e-12)


def test_listwise_equals_pairwise_for_per_group_masks_with_an_empty_group(x64):
  """A [G, N, N] mask mixing rules, with a padding group that has no pairs: the mean is over
  the batch's pairs, so the product group weighs by its 27 pairs against the row group's 9."""
  policy, ref = _groups(1, 3, 9, spread=0.5)
  mask = np.stack([pair_mask(3, 3, "product"), pair_mask(3, 3, "row"), np.zeros((9, 9), bool)])
  kw = dict(beta=0.2, loss_type="sigmoid", label_smoothing=0.1, temperature_scale=20.0)
  f = jax.jit(jax.value_and_grad(lambda p: ranked_dpo(p, ref, mask, **kw), has_aux=True))
  g = jax.jit(jax.value_and_grad(lambda p: pairwise_dpo_reference(p, ref, mask, **kw)[0]))
  (loss, aux), grad = f(jnp.asarray(policy))
  ref_loss, ref_grad = g(jnp.asarray(policy))
  np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-12)
  np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-12)
  assert (grad[2] == 0).all() and (grad[:2] != 0).any()  # the padding group gets no gradient
  assert aux["num_pairs"] == 27 + 9


def test_listwise_equals_pairwise_in_float32_within_1e6():
  policy, ref = _groups(2, 4, 25)
  mask = pair_mask(5, 5, "product")
  kw = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.1, temperature_scale=100.0)
  p = jnp.asarray(policy, jnp.float32)
  r = jnp.asarray(ref, jnp.float32)
  f = jax.jit(lambda p: ranked_dpo(p, r, mask, **kw)[0])
  g = jax.jit(lambda p: pairwise_dpo_reference(p, r, mask, **kw)[0])
  assert f(p).dtype == jnp.float32
  np.testing.assert_allclose(f(p), g(p), rtol=0, atol=1e-6)
  np.testing.assert_allclose(jax.grad(f)(p), jax.grad(g)(p), rtol=0, atol=1e-6)


def _one_pair(delta, scale=1.0):
  """One group of two images with image 0 preferred, whose delta is exactly `delta`."""
  policy = jnp.asarray([[delta / scale, 0.0]])
  return policy, jnp.zeros_like(policy), np.array([[False, True], [False, False]])


def test_closed_form_values_for_each_loss_type(x64):
  log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
  eps, scale = 0.3, 50.0
  mask = np.array([[False, True], [False, False]])  # image 0 preferred to image 1
  closed_forms = {
      ("sigmoid", 0.0): lambda d, b: -log_sigmoid(b * d),
      ("sigmoid", eps): lambda d, b: -(1 - eps) * log_sigmoid(b * d) - eps * log_sigmoid(-b * d),
      ("ipo", 0.0): lambda d, b: (d - 1 / (2 * b)) ** 2,
      ("hinge", 0.0): lambda d, b: max(0.0, 1 - b * d),
  }
  for (loss_type, smoothing), closed_form in closed_forms.items():
    for beta in (0.1, 1.0, 2.5):
      f = jax.jit(lambda p: ranked_dpo(p, jnp.zeros_like(p), mask, beta=beta, loss_type=loss_type,  # noqa: B023
                                       label_smoothing=smoothing, temperature_scale=scale)[0])
      for delta in (-3.0, -0.5, 0.0, 0.7, 4.0):
        policy = jnp.asarray([[delta / scale, 0.0]])  # so that delta is exactly `delta`
        np.testing.assert_allclose(f(policy), closed_form(delta, beta), rtol=1e-12, atol=1e-15,
                                   err_msg=f"{loss_type} eps={smoothing} beta={beta} "
                                           f"delta={delta}")


def test_closed_forms_at_landmark_deltas(x64):
  at = lambda delta, **kw: float(ranked_dpo(*_one_pair(delta), temperature_scale=1.0, **kw)[0])  # noqa: E731
  assert at(0.0, beta=0.1) == pytest.approx(math.log(2), abs=1e-15)
  assert at(0.0, beta=0.25, loss_type="ipo") == pytest.approx(1 / (4 * 0.25 ** 2), abs=1e-12)
  assert at(1 / (2 * 0.25), beta=0.25, loss_type="ipo") == pytest.approx(0.0, abs=1e-12)
  assert at(0.0, beta=0.5, loss_type="hinge") == pytest.approx(1.0, abs=1e-15)
  assert at(1.0, beta=0.5, loss_type="hinge") == pytest.approx(0.5, abs=1e-15)
  assert at(3.0, beta=0.5, loss_type="hinge") == 0.0


def test_temperature_scale_multiplies_delta(x64):
  policy, ref = _groups(3, 2, 4)
  mask = pair_mask(2, 2)
  at = lambda scale, beta: ranked_dpo(policy, ref, mask, beta=beta, temperature_scale=scale)[0]  # noqa: E731
  # beta * scale * raw delta is all that matters for the sigmoid loss.
  np.testing.assert_allclose(at(10.0, 0.1), at(1.0, 1.0), rtol=1e-12)
  assert abs(float(at(10.0, 0.1)) - float(at(1.0, 0.1))) > 1e-3


def test_label_smoothing_zero_is_plain_dpo(x64):
  policy, ref = _groups(4, 3, 9, spread=0.4)
  mask = pair_mask(3, 3, "product")
  scale, beta = 30.0, 0.2
  loss = ranked_dpo(policy, ref, mask, beta=beta, label_smoothing=0.0, temperature_scale=scale)[0]
  # numpy, independent of jax: -mean log sigmoid(beta * delta) over the pairs.
  deltas = [scale * ((policy[g, k] - policy[g, l]) - (ref[g, k] - ref[g, l]))
            for g in range(3) for k, l in np.argwhere(mask)]
  plain = np.mean([np.logaddexp(0.0, -beta * d) for d in deltas])
  np.testing.assert_allclose(loss, plain, rtol=1e-12)
  smoothed = ranked_dpo(policy, ref, mask, beta=beta, label_smoothing=0.1,
                        temperature_scale=scale)[0]
  assert abs(float(smoothed) - plain) > 1e-4


def test_policy_equal_to_reference_gives_log2(x64):
  _, ref = _groups(5, 4, 25)
  for beta in (1e-3, 0.1, 1.0, 37.0):
    for label_smoothing in (0.0, 0.25, 0.49):
      loss, aux = ranked_dpo(ref, ref, pair_mask(5, 5), beta=beta,
                             label_smoothing=label_smoothing, temperature_scale=100.0)
      assert float(loss) == pytest.approx(math.log(2), rel=1e-13), (beta, label_smoothing)
      assert float(aux["rewards/margins"]) == 0.0 and float(aux["rewards/accuracies"]) == 0.0
  # float32: log 2 up to the rounding of an 800-term sum.
  ref32 = jnp.asarray(ref, jnp.float32)
  loss, _ = ranked_dpo(ref32, ref32, pair_mask(5, 5), beta=0.1, temperature_scale=100.0)
  assert loss.dtype == jnp.float32 and float(loss) == pytest.approx(math.log(2), rel=1e-4)


def test_reward_metrics_follow_trl(x64):
  """Group of 3: image 0 beats 1 and 2, image 1 beats 2 (a 1x3 row); rewards are
  beta * scale * (s - r) per image, pair-weighted."""
  policy = jnp.asarray([[0.5, 0.1, 0.3]])
  ref = jnp.asarray([[0.2, 0.2, 0.2]])
  beta, scale = 0.5, 10.0
  _, aux = ranked_dpo(policy, ref, pair_mask(1, 3, "row"), beta=beta, temperature_scale=scale)
  reward = beta * scale * np.array([0.3, -0.1, 0.1])
  pairs = [(0, 1), (0, 2), (1, 2)]
  assert float(aux["rewards/chosen"]) == pytest.approx(np.mean([reward[k] for k, _ in pairs]))
  assert float(aux["rewards/rejected"]) == pytest.approx(np.mean([reward[l] for _, l in pairs]))
  assert float(aux["rewards/margins"]) == pytest.approx(
      np.mean([reward[k] - reward[l] for k, l in pairs]))
  assert float(aux["rewards/accuracies"]) == pytest.approx(2 / 3)  # pair (1, 2) is wrong
  assert float(aux["num_pairs"]) == 3


def test_gradient_step_on_policy_scores_raises_accuracy():
  policy, ref = _groups(6, 8, 9, spread=0.05)
  mask = pair_mask(3, 3)
  step = jax.jit(jax.value_and_grad(
      lambda p: ranked_dpo(p, ref, mask, beta=0.1, temperature_scale=100.0), has_aux=True))
  p = jnp.asarray(policy, jnp.float32)
  (_, before), _ = step(p)
  for _ in range(30):
    p = p - 0.05 * step(p)[1]
  (_, after), _ = step(p)
  assert float(before["rewards/accuracies"]) < 0.6
  assert float(after["rewards/accuracies"]) == 1.0  # the grid order is consistent: all pairs


def test_no_pairs_gives_zero_loss_and_finite_gradient():
  policy, ref = _groups(7, 2, 4)
  mask = np.zeros((4, 4), bool)
  (loss, aux), grad = jax.jit(jax.value_and_grad(
      lambda p: ranked_dpo(p, ref, mask, beta=0.1, temperature_scale=1.0), has_aux=True))(
          jnp.asarray(policy, jnp.float32))
  assert float(loss) == 0.0 and float(aux["num_pairs"]) == 0
  assert (grad == 0).all()


def test_reference_scores_get_no_gradient():
  policy, ref = _groups(8, 2, 4)
  f = lambda r: ranked_dpo(policy, r, pair_mask(2, 2), beta=0.1, temperature_scale=10.0)[0]  # noqa: E731
  assert (jax.grad(f)(jnp.asarray(ref, jnp.float32)) == 0).all()


def test_ranked_dpo_jits_with_a_traced_mask_and_scale():
  policy, ref = _groups(9, 2, 9)
  mask = np.stack([pair_mask(3, 3)] * 2)
  f = jax.jit(partial(ranked_dpo, beta=0.1, loss_type="sigmoid"))
  jitted = f(policy, ref, mask, temperature_scale=jnp.float32(50.0))[0]
  eager = ranked_dpo(policy, ref, mask, beta=0.1, temperature_scale=50.0)[0]
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)


@pytest.mark.parametrize("kwargs,name", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
    (dict(beta=0.1, label_smoothing=-0.01), "label_smoothing"),
    (dict(beta=0.1, loss_type="kto"), "loss_type"),
    (dict(beta=0.1, loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
    (dict(beta=0.1, temperature_scale=0.0), "temperature_scale"),
])
def test_ranked_dpo_refuses_bad_arguments_by_name(kwargs, name):
  policy, ref = _groups(10, 1, 4)
  kwargs = dict(dict(temperature_scale=1.0), **kwargs)
  with pytest.raises(ValueError, match=rf"^{name} "):
    ranked_dpo(policy, ref, pair_mask(2, 2), **kwargs)
  if name != "temperature_scale":
    with pytest.raises(ValueError, match=rf"^{name} "):
      pairwise_dpo_reference(policy, ref, pair_mask(2, 2), **kwargs)


def test_validate_dpo_args_names_the_config_key():
  with pytest.raises(ValueError, match=r"^config\.dpo\.beta must be > 0"):
    losses.validate_dpo_args(0.0, "sigmoid", 0.0, prefix="config.dpo.")
  c = train.default_config('align')   # the live defaults of the align section pass
  losses.validate_dpo_args(c.beta, c.dpo_loss, c.dpo_label_smoothing, prefix="config.align.")


def test_ranked_dpo_refuses_mismatched_shapes_by_name():
  policy, ref = _groups(11, 2, 4)
  with pytest.raises(ValueError, match="^ref_scores"):
    ranked_dpo(policy, ref[:, :3], pair_mask(2, 2), beta=0.1, temperature_scale=1.0)
  with pytest.raises(ValueError, match="^pair_mask"):
    ranked_dpo(policy, ref, pair_mask(3, 3), beta=0.1, temperature_scale=1.0)
  with pytest.raises(ValueError, match="^pair_mask must be bool"):
    ranked_dpo(policy, ref, pair_mask(2, 2).astype(int), beta=0.1, temperature_scale=1.0)
  with pytest.raises(ValueError, match="^policy_scores"):
    ranked_dpo(policy[0], ref[0], pair_mask(2, 2), beta=0.1, temperature_scale=1.0)


def test_beta_must_be_static_under_jit():
  policy, ref = _groups(12, 1, 4)
  f = jax.jit(lambda b: ranked_dpo(policy, ref, pair_mask(2, 2), beta=b, temperature_scale=1.0))
  with pytest.raises(TypeError, match="beta must be a Python number"):
    f(0.1)


def test_preference_loss_is_elementwise():
  delta = jnp.asarray([[-1.0, 0.0], [2.0, 5.0]])
  out = preference_loss(delta, beta=0.5, loss_type="hinge")
  np.testing.assert_allclose(out, [[1.5, 1.0], [0.0, 0.0]])


# ------------------------------------------------------------------------------ InfoNCE

def _infonce_numpy(img, txt, scale, eps):
  img, txt = _unit(img), _unit(txt)
  logits = scale * img @ txt.T
  b = len(logits)
  targets = (1 - eps) * np.eye(b) + eps / b

  def ce(lg):
    logp = lg - np.logaddexp.reduce(lg, axis=1, keepdims=True)
    return -(targets * logp).sum(axis=1).mean()

  return (ce(logits) + ce(logits.T)) / 2


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_infonce_matches_numpy_reference(x64, eps):
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))  # not normalised: normalised inside
  loss, aux = clip_infonce(img, txt, 14.0, label_smoothing=eps)
  np.testing.assert_allclose(loss, _infonce_numpy(img, txt, 14.0, eps), rtol=1e-12)
  np.testing.assert_allclose((aux["i2t_loss"] + aux["t2i_loss"]) / 2, loss, rtol=1e-12)
  assert abs(float(aux["i2t_loss"]) - float(aux["t2i_loss"])) > 1e-6  # really two directions


def test_infonce_perfect_alignment_with_large_scale_is_near_zero():
  emb = np.eye(8, dtype=np.float32)
  loss, aux = clip_infonce(emb, emb, 100.0)
  assert 0.0 <= float(loss) < 1e-6
  assert float(aux["i2t_accuracy"]) == 1.0 and float(aux["t2i_accuracy"]) == 1.0
  # Orthonormal pairs: each row has one logit `scale` and B - 1 zeros.
  loss, _ = clip_infonce(emb, emb, 3.0)
  assert float(loss) == pytest.approx(math.log1p(7 * math.exp(-3.0)), rel=1e-6)


def test_infonce_of_identical_embeddings_is_log_batch_size():
  emb = np.ones((16, 4), np.float32)
  loss, _ = clip_infonce(emb, emb, 100.0, label_smoothing=0.2)
  assert float(loss) == pytest.approx(math.log(16), rel=1e-6)


def test_infonce_gradient_matches_finite_differences(x64):
  rng = np.random.default_rng(1)
  img, txt = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  f = jax.jit(lambda x: clip_infonce(x, txt, 5.0, label_smoothing=0.1)[0])
  grad = jax.grad(f)(img)
  h, e = 1e-6, np.zeros_like(img)
  e[2, 1] = h
  numeric = (f(img + e) - f(img - e)) / (2 * h)
  np.testing.assert_allclose(grad[2, 1], numeric, rtol=1e-6)


def test_infonce_bf16_inputs_compute_in_float32():
  rng = np.random.default_rng(2)
  img = jnp.asarray(rng.normal(size=(4, 8)), jnp.bfloat16)
  loss, _ = clip_infonce(img, img, 10.0)
  assert loss.dtype == jnp.float32


def test_infonce_refuses_bad_arguments_by_name():
  emb = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match="^label_smoothing"):
    clip_infonce(emb, emb, 10.0, label_smoothing=1.0)
  with pytest.raises(ValueError, match="img_emb and txt_emb"):
    clip_infonce(emb, emb[:3], 10.0)


# ------------------------------------------------------------------------------ SigLIP

def test_siglip_matches_numpy_reference(x64):
  rng = np.random.default_rng(3)
  img, txt = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  scale, bias = 10.0, -3.0
  logits = scale * _unit(img) @ _unit(txt).T + bias
  signs = 2 * np.eye(5) - 1
  expected = np.logaddexp(0.0, -signs * logits).sum(axis=1).mean()
  loss, _ = siglip_loss(img, txt, scale, bias)
  np.testing.assert_allclose(loss, expected, rtol=1e-12)
  # The bias is learnable: its gradient is the mean over images of sum_j (sigmoid(z) - y).
  grad_bias = jax.jit(jax.grad(lambda b: siglip_loss(img, txt, scale, b)[0]))(bias)
  y = np.eye(5)
  np.testing.assert_allclose(grad_bias, (1 / (1 + np.exp(-logits)) - y).sum(axis=1).mean(),
                             rtol=1e-10)


# ------------------------------------------------------------------------------ mutation survivors
# Each test below kills mutants the rest of this file let live (benchmarks/mutation.py).

def _row_ce(logits, eps):
  """Smoothed cross-entropy of each row's diagonal entry, averaged over rows (numpy)."""
  b = len(logits)
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  return -(((1 - eps) * np.eye(b) + eps / b) * logp).sum(axis=1).mean()


def test_infonce_aux_names_each_direction(x64):
  """i2t: each image's row over all texts; t2i: each text's row over all images. The batch
  is picked so that the two top-1 accuracies differ (0.0 and 0.4)."""
  rng = np.random.default_rng(1)
  img, txt = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  _, aux = clip_infonce(img, txt, 7.0, label_smoothing=0.2)
  logits = 7.0 * _unit(img) @ _unit(txt).T
  np.testing.assert_allclose(aux["i2t_loss"], _row_ce(logits, 0.2), rtol=1e-12)
  np.testing.assert_allclose(aux["t2i_loss"], _row_ce(logits.T, 0.2), rtol=1e-12)
  labels = np.arange(5)
  assert float(aux["i2t_accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == labels))
  assert float(aux["t2i_accuracy"]) == pytest.approx(np.mean(logits.argmax(0) == labels))
  assert float(aux["i2t_accuracy"]) != float(aux["t2i_accuracy"])


def test_siglip_accuracies_name_each_direction():
  rng = np.random.default_rng(1)   # the batch of the InfoNCE test: accuracies 0.0 and 0.4
  img, txt = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  _, aux = siglip_loss(img, txt, 10.0, -3.0)
  logits = _unit(img) @ _unit(txt).T
  labels = np.arange(5)
  assert float(aux["i2t_accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == labels))
  assert float(aux["t2i_accuracy"]) == pytest.approx(np.mean(logits.argmax(0) == labels))
  assert (float(aux["i2t_accuracy"]), float(aux["t2i_accuracy"])) == pytest.approx((0.0, 0.4))


def test_pairwise_reference_matches_ranked_dpo_at_its_edges(x64):
  """Defaults (sigmoid, no smoothing), a single pair, no pair, and ties (delta = 0, which is
  not a correctly ordered pair): the reference agrees with ranked_dpo in loss and metrics."""
  policy, ref = _groups(3, 2, 4)
  one = np.zeros((4, 4), bool)
  one[0, 3] = True
  for p, mask in ((policy, one), (policy, np.zeros((4, 4), bool)), (ref, pair_mask(2, 2))):
    loss, aux = ranked_dpo(p, ref, mask, beta=0.3, temperature_scale=5.0)
    ref_loss, ref_aux = pairwise_dpo_reference(p, ref, mask, beta=0.3, temperature_scale=5.0)
    np.testing.assert_allclose(ref_loss, loss, rtol=0, atol=1e-12)
    for key in aux:
      np.testing.assert_allclose(ref_aux[key], aux[key], rtol=0, atol=1e-12, err_msg=key)
  assert float(pairwise_dpo_reference(ref, ref, pair_mask(2, 2), beta=0.3,
                                      temperature_scale=5.0)[1]["rewards/accuracies"]) == 0.0
