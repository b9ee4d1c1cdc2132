"""Expert parallelism on 8 simulated CPU devices: the expert axis alone and with fsdp, tensor, data
and pipeline stages trains a tiny MoE model to the single-device losses, router statistics and
parameters, with the experts' weights really split over `expert` and tokens moved by all-to-all;
the sharded dispatch equals the single-device one even when every token picks one rank's experts
(the worst case its fixed-size buffers are sized for); mesh configs it cannot split fail early.

(tests/conftest.py makes the 8 devices.) Each layout's step is compiled once, in its own test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_parallel import expected_shard, rel_err, run, tiny_config

from jaxlm.config import ConfigError, parse_rules
from jaxlm.models import moe
from jaxlm.models.compute import Compute
from jaxlm.parallel import experts as expert_parallel
from jaxlm.parallel.mesh import resolve_mesh
from jaxlm.parallel.rules import axis_rules, partition_spec
from jaxlm.train.setup import make_setup

LAYOUTS = {  # name: mesh sizes (the rest 1)
    "ep8": dict(data=1, expert=8),
    "ep4_fsdp2": dict(data=1, fsdp=2, expert=4),
    "ep2_tp2_fsdp2": dict(data=1, fsdp=2, tensor=2, expert=2),
    "ep2_dp2_pp2": dict(data=2, stage=2, expert=2),
}


def moe_tiny_config(**mesh):
  c = tiny_config(**mesh)  # 2 layers, d_model 32, 8 rows of 16 tokens
  c.model.update(moe_num_experts=8, moe_experts_per_token=2, moe_mlp_dim=16)
  c.compute.pipeline_microbatches = 2  # stage 2: 2 micro-batches of 4 rows over data x expert
  # As in tests/test_pipeline.py: Adam turns near-zero gradients' rounding (the stages' and the
  # ranks' matmuls round differently from one device's) into ~1e-5 parameter differences at eps
  # 1e-8; eps 1e-6 bounds that, and the losses agree to 1e-6 either way.
  c.train.eps = 1e-6
  return c


@pytest.fixture(scope="module")
def reference():
  return run(moe_tiny_config(), devices=jax.devices()[:1])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_layout_matches_single_device(reference, name):
  got = run(moe_tiny_config(**LAYOUTS[name]))
  mesh = dict(got["setup"].mesh.shape)
  assert mesh["expert"] == LAYOUTS[name]["expert"] and got["setup"].mesh.size == 8
  np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-5)
  for metric in ("moe/balance_loss", "moe/router_z_loss", "moe/layer0/max_tokens",
                 "moe/layer1/min_over_mean"):  # of the whole batch, not of a shard or micro-batch
    np.testing.assert_allclose(got["metrics"][metric], reference["metrics"][metric], rtol=1e-5)
  errors = {jax.tree_util.keystr(path): rel_err(jax.device_get(a), jax.device_get(b))
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got["state"].params),
                                    jax.tree.leaves(reference["state"].params))}
  worst = max(errors, key=errors.get)
  print(f"\n{name}: loss {got['losses']}, max param rel error {errors[worst]:.1e} ({worst})")
  assert errors[worst] <= 1e-5, (worst, errors[worst])

  # The experts' weights (and their Adam moments) are split over `expert` along the experts axis:
  # [layers, experts, embed, mlp] / [layers, experts, mlp, embed].
  rules = got["setup"].rules
  mu = got["state"].opt_state[1][0].mu  # (clip, adamw(adam, ...))
  for tree in (got["state"].params, mu):
    for name_ in ("up", "gate", "down"):
      var = tree["moe_blocks"]["mlp"][name_]
      x, logical = var.get_value(), var.get_metadata()["out_sharding"]
      assert logical[:2] == ("layers", "experts") and x.sharding.spec[1] == "expert"
      want = expected_shard(x.shape, logical, mesh, rules)
      assert want[1] == 8 // mesh["expert"]
      assert {s.data.shape for s in x.addressable_shards} == {want}, (name_, x.shape)
  # tokens travel by all-to-all (out and back, in the forward and the backward pass)
  assert "all-to-all" in got["compiled"].as_text()


@pytest.mark.parametrize("grouped", ["blocks", "ragged"])
def test_sharded_dispatch_equals_dropless_when_one_rank_gets_every_token(grouped):
  """Value and gradients of the expert-parallel dispatch against moe.dropless on one device, with
  every token routed to experts 0 and 1 (rank 0 of 4 receives every assignment of every rank) and
  with random routing; both grouped matmuls (their padding rows of the receive buffers)."""
  mesh = jax.make_mesh((2, 4), ("fsdp", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = parse_rules("batch:fsdp+expert, embed:fsdp, experts:expert")
  b, t, d, f, e, k = 8, 4, 16, 8, 8, 2
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (b, t, d))
  w = moe.Experts(*(jax.random.normal(kk, s) * 0.3
                    for kk, s in zip(keys[1:4], [(e, d, f), (e, d, f), (e, f, d)])))
  weights = jax.nn.softmax(jax.random.normal(keys[4], (b, t, k)), -1)
  skewed = jnp.broadcast_to(jnp.array([1, 0], jnp.int32), (b, t, k))
  spread = jax.random.randint(keys[5], (b, t, k), 0, e)
  compute = Compute(moe_grouped_matmul=grouped)
  ffn = lambda *a: moe.grouped_ffn(*a, kind="swiglu", compute=compute)  # noqa: E731

  def sharded(x, weights, w, ids):
    with axis_rules(rules, mesh):
      assert expert_parallel.expert_shards() == 4
      return expert_parallel.sharded_dispatch(x, ids, weights, w, ffn)[0]

  def single(x, weights, w, ids):
    flat = lambda a: a.reshape(b * t, -1)  # noqa: E731
    return moe.dropless(flat(x), flat(ids), flat(weights), w, "swiglu", compute)[0].reshape(b, t, d)

  probe = jax.random.normal(jax.random.key(9), (b, t, d))
  # ids are an argument, so each program compiles once for both routings
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * probe)  # noqa: E731
  sharded_grad = jax.jit(jax.grad(loss(sharded), (0, 1, 2)))
  single_grad = jax.jit(jax.grad(loss(single), (0, 1, 2)))
  for ids in (skewed, spread):
    got = jax.jit(sharded)(x, weights, w, ids)
    np.testing.assert_allclose(got, jax.jit(single)(x, weights, w, ids), rtol=1e-5, atol=1e-6)
    grads = sharded_grad(x, weights, w, ids)
    for g, want in zip(jax.tree.leaves(grads), jax.tree.leaves(single_grad(x, weights, w, ids))):
      assert rel_err(g, want) <= 1e-5


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_exchange_factor_drops_past_each_ranks_room(factor):
  """model.moe_exchange_factor f: each device sends at most S = ceil(f * T*k / ranks) assignments to
  each expert rank, first choices first (then token order), and drops the rest. Against moe.dropless
  with the dropped assignments' weights zeroed by a plain-Python rule, value and gradients, and the
  dropped count; one token row a device (batch 8 over fsdp 2 x expert 4)."""
  mesh = jax.make_mesh((2, 4), ("fsdp", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = parse_rules("batch:fsdp+expert, embed:fsdp, experts:expert")
  b, t, d, f, e, k, ranks = 8, 4, 16, 8, 8, 2, 4
  keys = jax.random.split(jax.random.key(1), 6)
  x = jax.random.normal(keys[0], (b, t, d))
  w = moe.Experts(*(jax.random.normal(kk, s) * 0.3
                    for kk, s in zip(keys[1:4], [(e, d, f), (e, d, f), (e, f, d)])))
  weights = jax.nn.softmax(jax.random.normal(keys[4], (b, t, k)), -1)
  ffn = lambda *a: moe.grouped_ffn(*a, kind="swiglu", compute=Compute())  # noqa: E731
  slots = -(-int(factor * t * k) // ranks)

  def kept_mask(ids):  # per device (one batch row): per destination rank, the first `slots`
    kept = np.zeros((b, t, k), bool)
    for row in range(b):
      sent = [0] * ranks
      for choice in range(k):
        for token in range(t):
          rank = int(ids[row, token, choice]) // (e // ranks)
          kept[row, token, choice] = sent[rank] < slots
          sent[rank] += 1
    return kept

  def sharded(x, weights, w, ids):
    with axis_rules(rules, mesh):
      return expert_parallel.sharded_dispatch(x, ids, weights, w, ffn, factor)

  def single(x, weights, w, ids, kept):
    flat = lambda a: a.reshape(b * t, -1)  # noqa: E731
    return moe.dropless(flat(x), flat(ids), flat(weights * kept), w, "swiglu")[0].reshape(b, t, d)

  probe = jax.random.normal(jax.random.key(9), (b, t, d))
  skewed = jnp.broadcast_to(jnp.array([1, 0], jnp.int32), (b, t, k))  # all to rank 0
  spread = jax.random.randint(keys[5], (b, t, k), 0, e)
  # ids and the kept mask are arguments, so each program compiles once for both routings
  sharded_grad = jax.jit(jax.grad(lambda *a: jnp.sum(sharded(*a)[0] * probe), (0, 1, 2)))
  single_grad = jax.jit(jax.grad(lambda *a: jnp.sum(single(*a) * probe), (0, 1, 2)))
  for ids in (skewed, spread):
    kept = kept_mask(np.asarray(ids))
    got, dropped = jax.jit(sharded)(x, weights, w, ids)
    assert int(dropped) == int((~kept).sum())
    np.testing.assert_allclose(got, jax.jit(single)(x, weights, w, ids, kept), rtol=1e-5, atol=1e-6)
    grads = sharded_grad(x, weights, w, ids)
    want = single_grad(x, weights, w, ids, kept)
    for g, wg in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
      assert rel_err(g, wg) <= 1e-5
  assert int((~kept_mask(np.asarray(skewed))).sum()) == b * (t * k - slots)  # the rule really drops


@pytest.mark.fast
def test_expert_mesh_errors_and_dense_models():
  c = moe_tiny_config(data=2, expert=4)
  c.model.moe_num_experts = 6
  with pytest.raises(ConfigError, match=r"model.moe_num_experts \(6\) is not divisible by the expert "
                                        r"axis \(4 = mesh.expert x mesh.dcn_expert\)"):
    resolve_mesh(c, 8)
  c = moe_tiny_config(data=2, expert=4)
  c.train.batch_size = 4
  with pytest.raises(ConfigError, match=r"not divisible by the data-like axes \(data x fsdp x expert = 8\)"):
    resolve_mesh(c, 8)
  c = moe_tiny_config(data=1, expert=8)
  c.mesh.update(expert=4, dcn_expert=2, dcn_data=1)  # 2 slices of 4: the expert axis is 8 across them
  c.model.moe_num_experts = 4
  with pytest.raises(ConfigError, match=r"model.moe_num_experts \(4\) is not divisible by the expert "
                                        r"axis \(8 = "):
    resolve_mesh(c, 8, num_slices=2)
  # A dense model with an expert axis runs fully sharded data parallel over it: rows split over
  # expert too, and the parameters' embed dimension (the rules give embed:fsdp+expert). fsdp is 1
  # here, so the specs leave it out: a size-1 axis splits nothing.
  c = tiny_config(data=2, expert=4)
  setup = make_setup(c)
  assert setup.batch_sharding.spec[0] == ("data", "expert")
  assert setup.batch_sharding.shard_shape((8, 16)) == (1, 16)
  assert partition_spec(("vocab", "embed"), setup.rules, (128, 32), setup.mesh)[1] == "expert"
  c = tiny_config(data=1, fsdp=2, expert=4)
  setup = make_setup(c)
  assert partition_spec(("vocab", "embed"), setup.rules, (128, 32), setup.mesh)[1] == ("fsdp", "expert")
