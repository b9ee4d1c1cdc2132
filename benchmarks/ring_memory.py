"""Per-device memory of attention forward + backward under context parallelism (compiled, not run).

At a fixed total row length, for sequence = 1, 2, 4, 8 simulated CPU devices (one row, split along
length over all of them), compiles the gradient of sum(attention(q, k, v) * w) with respect to q,
k and v through jaxlm's own dispatch (`attention_kernels.self_attention` under the rules table, as
in a train step) and prints XLA's `memory_analysis()` temp bytes per device, for:

  ring        compute.context_parallel="ring", each block pair by --block (flash: jaxlm's TPU
              kernels in interpret mode, the code that runs Mosaic on TPU; xla: einsum blocks)
  all_gather  compute.context_parallel="all_gather" with flash: every device gathers the row's K/V
  x n/base    ring temp bytes x sequence / (the same at the first size): 1.00 is exactly linear
              in t / n, below 1 falls faster than linear

Nothing is allocated or run.

  python benchmarks/ring_memory.py                          # seq 4096, flash blocks; ~2 min on 2 cores
  python benchmarks/ring_memory.py --block xla --no_all_gather
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", default="1,2,4,8", help="sequence axis sizes (at most 8 simulated)")
  p.add_argument("--seq", type=int, default=4096, help="total row length, fixed across sizes")
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--block", default="flash", choices=("flash", "xla"), help="ring block computation")
  p.add_argument("--kernel_block", type=int, default=256, help="flash block_q = block_k")
  p.add_argument("--no_all_gather", action="store_true", help="skip the all_gather column")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  counts = [int(x) for x in args.devices.split(",")]
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={max(counts)}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from jaxlm.config import base_config
  from jaxlm.models import attention_kernels, ring_attention
  from jaxlm.models.compute import Compute
  from jaxlm.parallel.rules import axis_rules

  cfg = base_config().model
  rules = (("batch", "data"), ("length", "sequence"))

  def temp_bytes(n: int, context_parallel: str, attention: str) -> int:
    mesh = Mesh(np.array(jax.devices()[:n]).reshape(1, n), ("data", "sequence"))
    compute = Compute(attention=attention, kernel_backend="interpret" if attention == "flash" else "",
                      flash_block_q=args.kernel_block, flash_block_k=args.kernel_block,
                      sequence_shards=n, context_parallel=context_parallel)

    def loss(q, k, v, w):
      with axis_rules(rules, mesh):
        if context_parallel == "ring":  # also at sequence=1: the ring of one device, no hops
          ring = ring_attention.Ring(axes=("sequence",), shards=n, block=attention,
                                     block_q=args.kernel_block, block_k=args.kernel_block)
          out = ring_attention.ring_attention(ring, q, k, v, None, None, None)
        else:
          out = attention_kernels.self_attention(cfg, compute, q, k, v, None, 0)
      return jnp.sum(out * w)

    split = NamedSharding(mesh, PartitionSpec(None, "sequence"))
    shapes = [jax.ShapeDtypeStruct((1, args.seq, h, args.head_dim), jnp.float32, sharding=split)
              for h in (args.heads, args.kv_heads, args.kv_heads, args.heads)]
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), out_shardings=(split,) * 3)
    return grad.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  print(f"attention forward + backward, one row of {args.seq} tokens, {args.heads} heads "
        f"({args.kv_heads} KV) x {args.head_dim}, float32; temp MB per device (memory_analysis)")
  print(f"{'sequence':>8s} {'ring (' + args.block + ')':>14s} {'x n/base':>8s}"
        + ("" if args.no_all_gather else f" {'all_gather':>11s}"))
  base = None
  for n in counts:
    ring = temp_bytes(n, "ring", args.block)
    base = base or ring * n  # the first size's bytes x its n: n x ring = base where exactly linear
    line = f"{n:8d} {ring / 1e6:14.1f} {ring * n / base:8.2f}"
    if not args.no_all_gather:
      line += f" {temp_bytes(n, 'all_gather', 'flash') / 1e6:11.1f}"
    print(line, flush=True)

if __name__ == "__main__":
  main()
