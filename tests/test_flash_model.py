"""model.attention: flash (interpret mode on CPU) inside the model, the layer scan and remat, and
10 training steps of the tiny config that match the xla reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import presets
from jaxlm.config import ConfigError, base_config, validate
from jaxlm.models import build_model
from jaxlm.models.compute import resolve, resolve_attention
from jaxlm.train import optimizer
from jaxlm.train.step import init_state, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  return presets.load("tiny").get_config()


def packed_batches(c, n, seed=0):
  """n batches of random tokens packed as 2-3 documents per row (segment ids, restarting positions)."""
  rng = np.random.default_rng(seed)
  b, t = c.train.batch_size, c.data.seq_len
  out = []
  for _ in range(n):
    tokens = rng.integers(0, c.model.vocab_size, (b, t + 1)).astype(np.int32)
    cuts = np.sort(rng.integers(1, t, (b, 2)), axis=1)
    seg = 1 + (np.arange(t)[None] >= cuts[:, :1]) + (np.arange(t)[None] >= cuts[:, 1:])
    starts = np.where(seg == 1, 0, np.where(seg == 2, cuts[:, :1], cuts[:, 1:]))
    out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg.astype(np.int32),
                "positions": (np.arange(t)[None] - starts).astype(np.int32),
                "weights": np.ones((b, t), np.int32)})
  return out


def train_losses(c, batches):
  validate(c)
  graphdef, params = nnx.split(build_model(c), nnx.Param)
  tx = optimizer.make_optimizer(c.train)
  state = init_state(params, tx, 0)
  step = jax.jit(make_train_step(graphdef, tx, c.train))  # compiled once, called per batch
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses)


def test_10_training_steps_with_flash_match_xla():
  c = tiny_config()
  c.compute.update(flash_block_q=16, flash_block_k=16)  # seq 64: 4 x 4 blocks, masked-block skipping
  batches = packed_batches(c, 10)
  xla = train_losses(c, batches)
  c.compute.attention = "flash"
  flash = train_losses(c, batches)
  rel = np.max(np.abs(flash - xla) / np.abs(xla))
  print(f"\n10 steps tiny config, flash vs xla: max relative loss difference {rel:.2e}; "
        f"losses {xla[0]:.4f} -> {xla[-1]:.4f}")
  assert xla[-1] < xla[0]
  assert rel <= 1e-4, (xla, flash)


@pytest.mark.parametrize("scan,remat", [(True, "full"), (False, "dots")])
def test_flash_gradients_match_xla_in_scan_and_remat(scan, remat):
  c = base_config()
  c.model.update(vocab_size=61, d_model=48, num_layers=2, num_heads=6, num_kv_heads=2, mlp_dim=64,
                 max_seq_len=40, sliding_window=11, attn_logit_softcap=20.0)
  c.compute.update(scan_layers=scan, remat_policy=remat, flash_block_q=16, flash_block_k=8)
  tokens = jax.random.randint(jax.random.key(0), (2, 37), 0, 61)  # 37: masked tails in both blocks
  segments = jnp.asarray(np.repeat([[1] * 20 + [2] * 17], 2, 0), jnp.int32)

  def grads(kind):
    c.compute.attention = kind
    graphdef, params = nnx.split(build_model(c, seed=1), nnx.Param)

    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens, segment_ids=segments)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)

  (l_x, g_x), (l_f, g_f) = grads("xla"), grads("flash")
  np.testing.assert_allclose(l_f, l_x, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


@pytest.mark.fast
def test_attention_choices_resolve_per_platform():
  """auto: the libraries' kernels until benchmarks/attention.py has measured ours faster."""
  assert resolve_attention("auto", "cpu") == ("xla", "")
  assert resolve_attention("auto", "tpu") == ("splash", "tpu")
  assert resolve_attention("auto", "gpu") == ("cudnn", "")
  assert resolve_attention("auto", "gpu", softcap=30.0) == ("xla", "")  # cuDNN has no soft-capping
  assert resolve_attention("flash", "cpu") == ("flash", "interpret")
  assert resolve_attention("flash", "tpu") == ("flash", "tpu")
  assert resolve_attention("flash", "gpu") == ("flash", "gpu")
  assert resolve_attention("splash", "cpu") == ("splash", "interpret")
  with pytest.raises(RuntimeError, match="cudnn.*needs a GPU"):
    resolve_attention("cudnn", "cpu")
  with pytest.raises(RuntimeError, match="splash.*TPU kernel"):
    resolve_attention("splash", "gpu")


@pytest.mark.fast
def test_sequence_shards_take_the_kernel_that_attends_only_their_own_queries():
  c = base_config().compute
  c.attention = "auto"
  sharded = resolve(c, "tpu", sequence_shards=4)
  assert (sharded.attention, sharded.kernel_backend, sharded.sequence_shards) == ("flash", "tpu", 4)
  assert resolve(c, "tpu").attention == "splash"
  assert resolve(c, "cpu", sequence_shards=4).sequence_shards == 1  # xla: no kernel, no reordering
  c.attention = "splash"
  with pytest.raises(ConfigError, match="splash.*sequence axis of 4.*'flash'"):
    resolve(c, "tpu", sequence_shards=4)
  c.attention = "flash"
  with pytest.raises(ConfigError, match="GPU kernel cannot yet"):
    resolve(c, "gpu", sequence_shards=2)


@pytest.mark.fast
def test_attention_config_is_validated():
  c = tiny_config()
  c.compute.attention = "pallas"
  with pytest.raises(ConfigError, match="compute.attention"):
    validate(c)
  c = tiny_config()
  c.compute.attention = "cudnn"
  c.model.attn_logit_softcap = 30.0
  with pytest.raises(ConfigError, match="softcap"):
    validate(c)
  c = tiny_config()
  c.compute.flash_block_q = 12
  with pytest.raises(ConfigError, match="compute.flash_block_q"):
    validate(c)


def test_flash_under_axis_rules_matches_xla_on_4_cpu_devices():
  """Batch over data, heads and kv_heads over tensor: the kernel runs per device in shard_map.

  A fresh process, because the device count is fixed when JAX starts.
  """
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_flash_check.py")],
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "sharded flash matches xla" in result.stdout
