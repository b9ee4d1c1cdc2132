"""The Mosaic TPU flash-attention kernels, forward and backward, compile ahead of time for v5e and v5p.

No TPU is needed: libtpu (the `test` extra installs it) supplies the compiler and
`get_topology_desc` abstract devices. A Mosaic pallas_call on a TPU mesh runs per device, so it
sits inside shard_map here exactly as in the model: batch over "data", heads over "tensor".
"""


import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.kernels.flash_attention import flash_attention
from jaxlm.kernels.splash import splash_attention

try:
  import libtpu  # noqa: F401  pylint: disable=unused-import
  from jax.experimental import topologies
  HAVE_LIBTPU = True
except ImportError:
  HAVE_LIBTPU = False


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[test]' installs it)")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_tpu_kernels_compile_ahead_of_time(topology):
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  mesh = Mesh(np.array(devices).reshape(2, -1), ("data", "tensor"))
  t, d = 8192, 128
  b, heads, kv_heads = 2 * mesh.shape["data"], 4 * mesh.shape["tensor"], 2 * mesh.shape["tensor"]
  x_spec, seg_spec = P("data", None, "tensor", None), P("data", None)

  def attention(q, k, v, seg):
    def local(q, k, v, seg):
      return flash_attention(q, k, v, seg, seg, causal=True, window=4096, softcap=50.0, backend="tpu")
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec),
                         out_specs=x_spec, check_vma=False)(q, k, v, seg)

  def grads(q, k, v, seg):
    return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, seg).astype(jnp.float32)),
                    argnums=(0, 1, 2))(q, k, v)

  def arg(shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

  args = (arg((b, t, heads, d), jnp.bfloat16, x_spec), arg((b, t, kv_heads, d), jnp.bfloat16, x_spec),
          arg((b, t, kv_heads, d), jnp.bfloat16, x_spec), arg((b, t), jnp.int32, seg_spec))
  for name, fn in (("forward", attention), ("forward+backward", grads)):
    compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    assert "flash_fwd" in text, f"{name}: the Mosaic forward kernel is missing from the executable"
    if name == "forward+backward":
      assert "flash_dq" in text and "flash_dkv" in text
    mem = compiled.memory_analysis()
    print(f"\n{topology} {name} t={t} head_dim={d}: per-device argument "
          f"{mem.argument_size_in_bytes / 2**20:.1f} MiB, output {mem.output_size_in_bytes / 2**20:.1f} MiB, "
          f"temp {mem.temp_size_in_bytes / 2**20:.1f} MiB")


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[test]' installs it)")
def test_splash_compiles_ahead_of_time():
  """jaxlm's splash wrapper (GQA, window, soft cap, segment ids) forward and backward for v5e,
  per device inside shard_map as flash runs."""
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))
  b, t, heads, kv_heads, d = 4, 8192, 8, 4, 128
  x_spec, seg_spec = P("data", None, "tensor", None), P("data", None)

  def loss(q, k, v, seg):
    def local(q, k, v, seg):
      return splash_attention(q, k, v, seg, causal=True, window=4096, softcap=50.0)
    out = jax.shard_map(local, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec),
                        out_specs=x_spec, check_vma=False)(q, k, v, seg)
    return jnp.sum(out.astype(jnp.float32))

  def arg(shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

  args = (arg((b, t, heads, d), jnp.bfloat16, x_spec), arg((b, t, kv_heads, d), jnp.bfloat16, x_spec),
          arg((b, t, kv_heads, d), jnp.bfloat16, x_spec), arg((b, t), jnp.int32, seg_spec))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
  assert text.count("tpu_custom_call") >= 3, "splash's forward, dq and dK/dV Mosaic kernels"


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[test]' installs it)")
def test_sequence_sharded_kernels_with_a_traced_q_offset_compile_ahead_of_time():
  """Queries split over a "sequence" axis against all keys, q_offset = the shard's first row: the
  offset reaches the kernels as a scalar-prefetch operand from axis_index."""
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = Mesh(np.array(devices).reshape(1, 4), ("data", "sequence"))
  b, t, heads, kv_heads, d = 2, 8192, 4, 2, 128
  q_spec, kv_spec = P("data", "sequence", None, None), P("data", None, None, None)

  def attention(q, k, v):
    def local(q, k, v):
      offset = jax.lax.axis_index("sequence") * q.shape[1]
      return flash_attention(q, k, v, causal=True, window=4096, backend="tpu", q_offset=offset)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)

  def grads(q, k, v):
    return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32)),
                    argnums=(0, 1, 2))(q, k, v)

  def arg(shape, spec):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))

  args = (arg((b, t, heads, d), q_spec), arg((b, t, kv_heads, d), kv_spec), arg((b, t, kv_heads, d), kv_spec))
  text = jax.jit(grads).lower(*args).compile().as_text()
  assert "flash_fwd" in text and "flash_dq" in text and "flash_dkv" in text


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[test]' installs it)")
def test_model_with_flash_compiles_for_a_sharded_tpu_mesh(monkeypatch):
  """The model's flash path under axis rules (batch over data, heads over tensor), scan + remat."""
  from flax import nnx
  from jaxlm.config import base_config
  from jaxlm.models import build_model
  from jaxlm.parallel.rules import axis_rules

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "tensor"))
  rules = [("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor")]
  c = base_config()
  c.model.update(vocab_size=256, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=512, max_seq_len=1024, sliding_window=512)
  c.compute.update(attention="flash", remat_policy="full", compute_dtype="bfloat16")
  # The mesh's platform picks the kernel backend (this host is CPU; the devices are TPU).
  abstract = nnx.eval_shape(lambda: build_model(c, platform=mesh.devices.flat[0].platform))
  graphdef, params = nnx.split(abstract, nnx.Param)
  replicated = NamedSharding(mesh, P())
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)
  tokens = jax.ShapeDtypeStruct((4, 1024), jnp.int32, sharding=NamedSharding(mesh, P("data", None)))

  def loss(params, tokens):
    with axis_rules(rules, mesh):
      logits = nnx.merge(graphdef, params)(tokens, segment_ids=jnp.ones_like(tokens))
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  text = jax.jit(jax.grad(loss)).lower(params, tokens).compile().as_text()
  assert "flash_fwd" in text and "flash_dq" in text and "flash_dkv" in text
