"""One MoE layer's training step time by dispatch: dropless (ragged_dot and blocks), capacity, and the
dense all-experts reference, from one run.

  python benchmarks/moe.py                                   # 8192 tokens, d 512, 8 experts top-2
  python benchmarks/moe.py --tokens 4096 --experts 16 --mlp_dim 512 --iters 5

Each variant is jax.jit(value_and_grad) of sum(out * cotangent) over the layer's parameters and its
input (forward + backward, router included), on the default backend, float32. Time is the median of
--iters calls after a warm-up call. Variants (jaxlm/models/moe.py):
  dropless/ragged  dispatch "dropless", compute.moe_grouped_matmul="ragged" (jax.lax.ragged_dot)
  dropless/blocks  dispatch "dropless", compute.moe_grouped_matmul="blocks" (padded blocks, batched)
  capacity 1.25    dispatch "capacity", factor --capacity (drops overflow; dropped share printed)
  reference        every expert on every token, combined with the top-k weights (E/k x the FLOPs)
Ratios are each variant's time over dropless/ragged's. "active GFLOP" is the routed experts'
useful matmul work (top-k per token), forward + backward (3 x forward).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import base_config
from jaxlm.models import moe
from jaxlm.models.compute import Compute

VARIANTS = (("dropless/ragged", "dropless", "ragged"), ("dropless/blocks", "dropless", "blocks"),
            ("capacity", "capacity", "ragged"), ("reference", "reference", "ragged"))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=8192)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--mlp_dim", type=int, default=1024, help="one expert's hidden width (SwiGLU)")
  p.add_argument("--capacity", type=float, default=1.25)
  p.add_argument("--iters", type=int, default=5)
  return p.parse_args(argv)


def layer_step(args, dispatch: str, grouped: str):
  """(jitted step(params, x) -> (loss, grads, dropped), params, x) of one MoE layer."""
  m = base_config().model
  m.update(d_model=args.d_model, moe_num_experts=args.experts, moe_experts_per_token=args.top_k,
           moe_mlp_dim=args.mlp_dim, moe_capacity_factor=args.capacity)
  layer = moe.MoE(m, Compute(moe_grouped_matmul=grouped), nnx.Rngs(0), out_std=0.02)
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, args.tokens, args.d_model))
  cot = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  def loss(params, x):
    out, stats = nnx.merge(graphdef, params)(x, dispatch=dispatch)
    return jnp.sum(out * cot), stats["dropped"]

  @jax.jit
  def step(params, x):
    (value, dropped), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return value, grads, dropped
  return step, params, x


def time_it(step, params, x, iters: int) -> tuple[float, float]:
  _, _, dropped = jax.block_until_ready(step(params, x))  # compile + warm-up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return statistics.median(times), float(dropped)


def main(argv=None):
  args = parse_args(argv)
  gated = 3  # SwiGLU: up, gate, down
  active = 3 * 2 * args.tokens * args.top_k * gated * args.d_model * args.mlp_dim / 1e9
  print(f"backend {jax.default_backend()}: {args.tokens} tokens, d_model {args.d_model}, "
        f"{args.experts} experts of SwiGLU {args.mlp_dim}, top-{args.top_k}, float32; "
        f"active {active:.1f} GFLOP a step (fwd+bwd)")
  print(f"{'variant':<18}{'ms/step':>10}{'÷ragged':>10}{'dropped':>10}")
  base = None
  for name, dispatch, grouped in VARIANTS:
    seconds, dropped = time_it(*layer_step(args, dispatch, grouped), args.iters)
    base = base or seconds
    label = f"capacity {args.capacity:g}" if dispatch == "capacity" else name
    share = dropped / (args.tokens * args.top_k)
    print(f"{label:<18}{seconds * 1e3:>10.1f}{seconds / base:>10.2f}{share:>10.1%}")


if __name__ == "__main__":
  main()
