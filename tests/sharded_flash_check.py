"""Run by tests/test_flash_model.py in a subprocess with 4 CPU devices."""
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxlm.config import base_config
from jaxlm.models import build_model
from jaxlm.parallel.rules import axis_rules

assert len(jax.devices()) == 4
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tensor"))
rules = [("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor")]
c = base_config()
c.model.update(vocab_size=61, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4, mlp_dim=64,
               max_seq_len=40, sliding_window=9)
c.compute.update(flash_block_q=16, flash_block_k=8)
tokens = jax.random.randint(jax.random.key(0), (4, 37), 0, 61)
segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 17], 4, 0), jnp.int32)

def run(kind):
  c.compute.attention = kind
  graphdef, params = nnx.split(build_model(c, seed=1, platform="cpu"), nnx.Param)
  def loss(p):
    with axis_rules(rules, mesh):
      logits = nnx.merge(graphdef, p)(tokens, segment_ids=segments)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
  fn = jax.jit(jax.value_and_grad(loss))
  if kind == "flash":
    assert "shard_map" in str(jax.make_jaxpr(loss)(params)), "flash did not run inside shard_map"
  return fn(params)

(lx, gx), (lf, gf) = run("xla"), run("flash")
np.testing.assert_allclose(lf, lx, rtol=1e-5)
for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gx)):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
print("sharded flash matches xla", float(lf), float(lx))
