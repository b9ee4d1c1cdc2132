"""The MoE layer (jaxlm/models/moe.py): dispatches against the dense all-experts reference, routing
rules, capacity drops, and the router bias update."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import base_config
from jaxlm.models import moe
from jaxlm.models.compute import Compute

TOL = 1e-5


def _cfg(**kw):
  m = base_config().model
  m.vocab_size, m.d_model, m.mlp_dim = 64, 16, 32
  m.moe_num_experts, m.moe_experts_per_token = 4, 2
  m.init_std = 0.3  # outputs of order 1, so the tolerance means something
  for k, v in kw.items():
    m[k] = v
  return m


def _layer(seed=0, grouped="ragged", **kw):
  return moe.MoE(_cfg(**kw), Compute(moe_grouped_matmul=grouped), nnx.Rngs(seed), out_std=0.3)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compiled_out_and_grads(graphdef, dispatch, params, x, cotangent):
  """One program per layer structure, dispatch and shapes: layers that differ only in their
  parameters (another seed, a zeroed router) reuse it instead of compiling it again."""
  def f(params, x):
    out, _ = nnx.merge(graphdef, params)(x, dispatch=dispatch)
    return jnp.sum(out * cotangent), out
  (_, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
  return out, grads


def _out_and_grads(layer, x, dispatch, cotangent):
  """(out, grads of sum(out * cotangent) w.r.t. x and every parameter) of one dispatch."""
  graphdef, params = nnx.split(layer)
  return _compiled_out_and_grads(graphdef, dispatch, params, x, cotangent)


def _check_equal(layer, x, other="dropless"):
  """other's output and gradients equal the reference's; dropless is checked with both grouped
  matmuls (compute.moe_grouped_matmul ragged and blocks)."""
  cot = jax.random.normal(jax.random.PRNGKey(9), x.shape)
  ref, ref_grads = _out_and_grads(layer, x, "reference", cot)
  for grouped in (("ragged", "blocks") if other == "dropless" else ("ragged",)):
    layer.compute = Compute(moe_grouped_matmul=grouped)
    out, grads = _out_and_grads(layer, x, other, cot)
    np.testing.assert_allclose(out, ref, atol=TOL, rtol=TOL, err_msg=grouped)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, atol=TOL, rtol=TOL, err_msg=grouped)
  return out


@pytest.mark.fast
@pytest.mark.parametrize("kw", [
    {},  # Mixtral-like: softmax top-2 of 4, swiglu
    {"mlp_kind": "gelu", "moe_experts_per_token": 1, "moe_norm_topk": False},
    {"moe_router": "sigmoid", "moe_num_experts": 8, "moe_groups": 4, "moe_topk_groups": 2,
     "moe_routed_scale": 2.5, "moe_shared_experts": 1},  # DeepSeek-V3-like
])
def test_dropless_equals_reference(kw):
  layer = _layer(**kw)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 16))
  out = _check_equal(layer, x)
  assert float(jnp.abs(out).max()) > 0.1  # not trivially small


@pytest.mark.fast
def test_dropless_ties_and_repeated_tokens():
  """A zero router ties every score: lax.top_k takes the lowest ids, so every token goes to
  experts 0 and 1 (each expert's group holds all tokens); a batch repeating the same token also
  sends identical rows to the same experts. Both dispatches must still equal the reference."""
  # Both inputs [2, 12, 16], test_dropless_equals_reference's shape for the same layer config, so
  # the three compiled programs are shared with it (_compiled_out_and_grads).
  layer = _layer()
  layer.router[...] = jnp.zeros_like(layer.router[...])
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 12, 16))
  _, r = layer.routing(x[0])
  assert np.all(np.asarray(r.ids) == [0, 1])
  np.testing.assert_allclose(r.weights, 0.5)
  _check_equal(layer, x)

  layer = _layer(seed=3)
  same = jnp.tile(jax.random.normal(jax.random.PRNGKey(4), (1, 1, 16)), (1, 6, 1))
  x = jnp.concatenate([same, jax.random.normal(jax.random.PRNGKey(5), (1, 6, 16))], axis=1)
  x = jnp.concatenate([x, jax.random.normal(jax.random.PRNGKey(6), (1, 12, 16))], axis=0)
  _check_equal(layer, x)


def _kept_mask(ids, experts, factor):
  """Which assignments capacity dispatch keeps, by its documented rule, in plain Python."""
  t, k = ids.shape
  cap = max(1, math.ceil(factor * t * k / experts))
  taken, kept = [0] * experts, np.zeros((t, k), bool)
  for j in range(k):
    for i in range(t):
      e = int(ids[i, j])
      if taken[e] < cap:
        taken[e] += 1
        kept[i, j] = True
  return kept


@pytest.mark.fast
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_capacity_drops_overflow_and_keeps_the_rest(factor):
  layer = _layer(moe_capacity_factor=factor)
  experts = layer.experts()
  x = jax.random.normal(jax.random.PRNGKey(6), (24, 16))
  _, r = layer.routing(x)
  # skew the routing so some expert overflows
  ids = r.ids.at[:12, 0].set(3)
  ids = jnp.where(ids[:, :1] == ids[:, 1:], (ids + 1) % 4, ids).at[:, 0].set(ids[:, 0])
  kept = _kept_mask(np.asarray(ids), 4, factor)
  # compiled: one program each instead of op-by-op dispatch of every primitive
  capacity = jax.jit(moe.capacity, static_argnames=("kind", "factor"))
  reference = jax.jit(moe.reference, static_argnames=("kind",))
  out, dropped = capacity(x, ids, r.weights, experts, kind="swiglu", factor=factor)
  assert int(dropped) == int((~kept).sum()) and int(dropped) > 0
  ref, _ = reference(x, ids, r.weights * kept, experts, kind="swiglu")
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=TOL)
  full, _ = reference(x, ids, r.weights, experts, kind="swiglu")
  whole = kept.all(1)  # tokens with no dropped assignment get exactly the reference output
  np.testing.assert_allclose(out[whole], full[whole], atol=TOL, rtol=TOL)


@pytest.mark.fast
def test_capacity_gradients_match_reference_when_nothing_drops():
  layer = _layer(moe_capacity_factor=4.0)  # room for every assignment
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 16))
  _check_equal(layer, x, "capacity")
  _, stats = nnx.jit(lambda layer, x: layer(x))(layer, x)  # compiled: faster than op by op
  assert float(stats["dropped"]) == 0


@pytest.mark.fast
def test_route_rules():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
  r = moe.route(logits, 2)
  assert r.ids.tolist() == [[0, 1], [0, 1]]
  p = jax.nn.softmax(logits[0])
  np.testing.assert_allclose(r.weights[0], p[:2] / p[:2].sum(), rtol=1e-6)
  np.testing.assert_allclose(r.weights.sum(-1), 1.0, rtol=1e-6)
  # sigmoid: the bias changes the choice, not the weights
  s = moe.route(logits, 1, "sigmoid", bias=jnp.array([0.0, 0.0, 0.0, 5.0]), norm_topk=False)
  assert s.ids[:, 0].tolist() == [3, 3]
  np.testing.assert_allclose(s.weights[:, 0], jax.nn.sigmoid(logits[:, 3]), rtol=1e-6)
  # groups of 2: group {2,3} scores best for row 0 once expert 3 is boosted; only it is eligible
  g = moe.route(logits, 2, "sigmoid", bias=jnp.array([0.0, 0.0, 0.0, 5.0]), groups=2, topk_groups=1)
  assert g.ids[0].tolist() == [3, 2]


@pytest.mark.fast
def test_router_stats_and_bias_update():
  r = moe.route(jnp.array([[5.0, 0, 0, 0]] * 4), 1)  # every token on expert 0
  stats = moe.router_stats(jnp.zeros((4, 4)), r, 4)
  assert stats["load"].tolist() == [4, 0, 0, 0]
  assert float(stats["balance"]) > 3  # near E=4 when one expert takes all; 1 when balanced
  np.testing.assert_allclose(stats["z"], math.log(4) ** 2, rtol=1e-6)
  load = jnp.array([[4.0, 0, 2, 2], [1, 1, 1, 1]])
  stacked = {"moe_blocks": {"mlp": {"router_bias": jnp.zeros((2, 4)), "up": jnp.ones((2, 3))}}}
  new = moe.update_router_bias(stacked, load, 0.1)
  np.testing.assert_allclose(new["moe_blocks"]["mlp"]["router_bias"],
                             [[-0.1, 0.1, 0, 0], [0, 0, 0, 0]])
  assert new["moe_blocks"]["mlp"]["up"] is stacked["moe_blocks"]["mlp"]["up"]
  listed = {"moe_blocks": {0: {"mlp": {"router_bias": jnp.zeros(4)}},
                           1: {"mlp": {"router_bias": jnp.zeros(4)}}}}
  new = moe.update_router_bias(listed, load, 0.1)
  np.testing.assert_allclose(new["moe_blocks"][0]["mlp"]["router_bias"], [-0.1, 0.1, 0, 0])
  np.testing.assert_allclose(new["moe_blocks"][1]["mlp"]["router_bias"], 0)


@pytest.mark.fast
def test_window_balance_sums_the_steps_loads():
  """Two steps each 1.5x unbalanced in opposite directions balance over their window."""
  steps = [jnp.array([[3.0, 1], [2, 2]]), jnp.array([[1.0, 3], [2, 2]])]
  for load in steps:
    np.testing.assert_allclose(moe.load_metrics(load, jnp.zeros(2))["moe/max_over_mean"], 1.5)
  window = moe.window_load_metrics(steps[0] + steps[1])
  np.testing.assert_allclose(window["moe/window_max_over_mean"], 1.0)
  np.testing.assert_allclose(moe.window_load_metrics(steps[0])["moe/layer0/window_max_over_mean"], 1.5)
  np.testing.assert_allclose(moe.window_load_metrics(steps[0])["moe/layer1/window_max_over_mean"], 1.0)
