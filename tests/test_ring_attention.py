"""Ring attention (compute.context_parallel="ring"): each device's keys and values go round the
sequence axis; outputs and gradients equal plain attention's, and training on 8 simulated devices
(sequence=8, and sequence=4 x fsdp=2) gives the single-device losses at seq 1024.

What runs where: the seq-1024 training runs compute each block pair with xla (einsum) blocks; the
flash block path (jaxlm's TPU kernels, in Pallas interpret mode on CPU) is checked against the
reference at a smaller size. The Mosaic TPU compile is checked by the AOT planner (benchmarks/README.md).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from jaxlm.config import ConfigError, base_config, validate
from jaxlm.models import compute as compute_lib
from jaxlm.models import ring_attention
from jaxlm.models.attention import dot_product_attention
from jaxlm.models.ring_attention import Ring, ring_local
from jaxlm.parallel import sequence
from test_parallel import check_same_numbers, run, tiny_config

B, T, H, KVH, D = 2, 64, 4, 2, 16


def _inputs(segments: bool):
  rng = np.random.default_rng(0)
  q, w = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.normal(size=(B, T, KVH, D)), jnp.float32) for _ in range(2))
  seg = None
  if segments:  # documents cut inside chunks, and one shorter than a chunk
    seg = np.ones((B, T), np.int32)
    seg[0, 20:] = 2
    seg[1, 40:44] = 3
    seg[1, 44:] = 4
    seg = jnp.asarray(seg)
  return q, k, v, w, seg


def _compare(n: int, ring: Ring, segments: bool, tol: float = 2e-6):
  """Ring attention over n devices against the reference, outputs and d(q, k, v)."""
  q, k, v, w, seg = _inputs(segments)
  slots = jnp.broadcast_to(jnp.arange(T), (B, T))

  def reference(q, k, v):
    return dot_product_attention(q, k, v, slots, slots, seg, seg, window=ring.window,
                                 softcap=ring.softcap)

  mesh = Mesh(np.array(jax.devices()[:n]), ("sequence",))
  order = sequence.balanced_order(T, n)
  natural = np.argsort(order)
  spec = PartitionSpec(None, "sequence")

  def ringed(q, k, v):
    fn = jax.shard_map(functools.partial(ring_local, ring), mesh=mesh,
                       in_specs=(spec, spec, spec, None if seg is None else spec), out_specs=spec,
                       check_vma=False)
    s = None if seg is None else seg[:, order]
    return fn(q[:, order], k[:, order], v[:, order], s)[:, natural]

  def loss(f):
    return lambda q, k, v: jnp.sum(f(q, k, v) * w)

  np.testing.assert_allclose(jax.jit(ringed)(q, k, v), jax.jit(reference)(q, k, v), atol=tol)
  got = jax.jit(jax.grad(loss(ringed), (0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(reference), (0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", got, want):
    err = float(jnp.abs(a - b).max() / jnp.abs(b).max())
    assert err < tol, (name, err)


@pytest.mark.parametrize("n", [1, 2, 8])
def test_ring_with_xla_blocks_matches_attention_and_its_gradients(n):
  """Causal, GQA, soft-capping and packed segments; n = 1 is the ring of one device (no hops)."""
  _compare(n, Ring(axes=("sequence",), shards=n, softcap=5.0), segments=True)


def test_ring_without_segments_and_with_a_sliding_window():
  _compare(4, Ring(axes=("sequence",), shards=4, window=12), segments=False)


def test_ring_with_segments_and_a_sliding_window():
  _compare(4, Ring(axes=("sequence",), shards=4, window=12, softcap=5.0), segments=True)


def test_ring_with_flash_blocks_matches_attention_and_its_gradients():
  """jaxlm's TPU flash kernels per block pair (Pallas interpret mode on CPU): chunks of 8 rows in
  blocks of 8, with a window that leaves some pairs partly and some wholly hidden."""
  ring = Ring(axes=("sequence",), shards=4, window=20, softcap=5.0, block="flash",
              backend="interpret", block_q=8, block_k=8)
  _compare(4, ring, segments=True)


SEQ = 1024  # 16 chunks of 64 tokens, two a device at sequence=8


def _seq_config(**mesh):
  c = tiny_config(**mesh)
  c.model.update(max_seq_len=SEQ, num_heads=4, num_kv_heads=2)
  c.data.seq_len = SEQ
  c.train.batch_size = 2
  return validate(c)


@pytest.fixture(scope="module")
def one_device():
  return run(_seq_config(), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh", [dict(data=1, sequence=8), dict(data=1, sequence=4, fsdp=2)],
                         ids=["sequence8", "sequence4_fsdp2"])
def test_ring_trains_like_one_device_at_seq_1024(one_device, mesh):
  """3 steps on packed rows (segment ids: documents cut inside chunks, padding) with xla blocks:
  losses within 1e-5 (relative) of one device, parameters norm-wise too; the step passes K/V by
  collective-permute."""
  c = _seq_config(**mesh)
  c.compute.context_parallel = "ring"
  got = run(c)
  assert got["setup"].compute.context_parallel == "ring"
  assert got["setup"].compute.sequence_shards == mesh["sequence"]
  rel = np.abs(got["losses"] / one_device["losses"] - 1).max()
  print(f"\nring {mesh}: losses {got['losses']}, one device {one_device['losses']}, max rel {rel:.1e}")
  assert rel <= 1e-5
  check_same_numbers("ring", got, one_device)
  assert "collective-permute" in got["compiled"].as_text()


@pytest.mark.fast
def test_ring_config_is_checked_and_resolved():
  c = base_config()
  c.compute.context_parallel = "rings"
  with pytest.raises(ConfigError, match="compute.context_parallel"):
    validate(c)
  for attention in ("splash", "cudnn"):
    c = base_config()
    c.compute.update(context_parallel="ring", attention=attention)
    with pytest.raises(ConfigError, match="compute.context_parallel='ring'"):
      validate(c)
  c = base_config()
  c.compute.context_parallel = "ring"
  c.model.attention_kind = "mla"
  with pytest.raises(ConfigError, match="compute.context_parallel='ring' is not wired"):
    validate(c)

  c = base_config()
  c.compute.update(context_parallel="ring", attention="auto")
  cpu = compute_lib.resolve(c.compute, "cpu", 4)
  assert (cpu.attention, cpu.context_parallel, cpu.sequence_shards) == ("xla", "ring", 4)
  tpu = compute_lib.resolve(c.compute, "tpu", 4)
  assert (tpu.attention, tpu.kernel_backend, tpu.context_parallel) == ("flash", "tpu", "ring")
  assert compute_lib.resolve(c.compute, "cpu", 1).context_parallel == "all_gather"  # no sequence axis
  c.compute.attention = "flash"
  with pytest.raises(ConfigError, match="compute.attention='xla' for the ring"):
    compute_lib.resolve(c.compute, "gpu", 4)
  # all_gather keeps today's behaviour: xla attention is not sequence-sharded by the model
  c.compute.update(context_parallel="all_gather", attention="xla")
  assert compute_lib.resolve(c.compute, "cpu", 4).sequence_shards == 1


def test_ring_with_the_mosaic_flash_kernel_compiles_for_a_tpu_slice(monkeypatch):
  """The planner's compile (libtpu, abstract v5p chips): ring attention over sequence=4 with the
  Mosaic flash kernel per block pair, inside shard_map, lowers and fits."""
  pytest.importorskip("libtpu", reason="the planner needs libtpu (pip install -e '.[test]')")
  from jaxlm import presets
  from jaxlm.aot.plan import plan, tpu_devices

  c = presets.load("tiny").get_config()
  c.model.update(d_model=256, num_heads=2, num_kv_heads=2, mlp_dim=512, max_seq_len=1024)
  c.data.seq_len = 1024  # chunks of 128 rows: one TPU block
  c.mesh.update(data=1, fsdp=1, sequence=4)
  c.compute.update(context_parallel="ring", attention="flash")
  c.train.batch_size = 1
  rings = []
  real = ring_attention.ring_attention
  monkeypatch.setattr(ring_attention, "ring_attention", lambda ring, *a: rings.append(ring) or real(ring, *a))
  p = plan(validate(c), tpu_devices("v5p:2x2x1"))
  assert p.mesh["sequence"] == 4 and p.fits and p.temporaries > 0
  assert rings and all(r.block == "flash" and r.backend == "tpu" and r.shards == 4 for r in rings)
