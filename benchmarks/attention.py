"""Attention kernels: TFLOP/s and memory, forward and forward+backward, against the XLA reference.

  python benchmarks/attention.py                 # on the default backend; on CPU tiny shapes, xla only
  python benchmarks/attention.py --impls xla,flash --seqs 1024,2048,4096,8192,16384 --head_dims 64,128

Implementations (--impls, default per backend):
  xla    jaxlm.models.attention.dot_product_attention, the float32-softmax reference
  flash  jaxlm.kernels.flash_attention (Mosaic TPU on TPU, Mosaic GPU on Hopper; on CPU Pallas
         interpret mode, which is a correctness tool, orders of magnitude slower than real kernels:
         use tiny --seqs)
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"), GPU only
  splash jaxlm.kernels.splash.splash_attention (JAX's TPU splash kernel; on CPU interpret mode)
Defaults: TPU xla,flash,splash; GPU xla,cudnn,flash; CPU xla.

FLOPs: forward 4*b*h*t*s*d (QK^T and PV), causal counted as half; forward+backward 3.5x forward
(the backward pass does 5 of the forward's 2 matmul shapes: recomputed QK^T, dV, dP, dQ, dK).
Time is the median of --iters calls after a warm-up call. Memory is XLA's compiled estimate for the
jitted function, temp + output (arguments excluded), so the xla reference shows its
[heads, t, s] score matrix and flash only its O(t) statistics. "÷xla" and "÷cudnn" are TFLOP/s over
the xla and cudnn rows of the same shape (cudnn: GPU only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlm.kernels.flash_attention import flash_attention
from jaxlm.kernels.splash import splash_attention
from jaxlm.models.attention import dot_product_attention


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--impls", default="", help="comma-separated xla,flash,cudnn,splash; empty: per backend")
  p.add_argument("--seqs", default="", help="sequence lengths; empty: 1k-16k on accelerators, 128,256 on CPU")
  p.add_argument("--head_dims", default="64,128")
  p.add_argument("--causal", default="1,0", help="1: causal, 0: full; comma-separated")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=0, help="0: 16 on accelerators, 2 on CPU")
  p.add_argument("--kv_heads", type=int, default=0, help="0: same as --heads")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--block_q", type=int, default=0, help="flash block sizes; 0: the backend default")
  p.add_argument("--block_k", type=int, default=0)
  return p.parse_args(argv)


def impl_fn(name: str, causal: bool, args):
  """(q, k, v) -> o for one implementation; inputs [b, t, heads, d]."""
  if name == "xla":
    def xla(q, k, v):
      b, t = q.shape[:2]
      slots = jnp.broadcast_to(jnp.arange(t), (b, t))
      return dot_product_attention(q, k, v, slots, slots, causal=causal)
    return xla
  if name == "flash":
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, block_q=args.block_q or None,
                                           block_k=args.block_k or None)
  if name == "cudnn":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  if name == "splash":
    return lambda q, k, v: splash_attention(q, k, v, causal=causal, interpret=jax.default_backend() == "cpu")
  raise ValueError(name)


def measure(fn, inputs, iters: int):
  """(median seconds, temp+output MiB) of jit(fn)(*inputs)."""
  compiled = jax.jit(fn).lower(*inputs).compile()
  mem = compiled.memory_analysis()
  mib = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20 if mem is not None else float("nan")
  jax.block_until_ready(compiled(*inputs))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - start)
  return statistics.median(times), mib


def main(argv=None):
  args = parse_args(argv)
  platform = jax.default_backend()
  on_cpu = platform == "cpu"
  impls = args.impls.split(",") if args.impls else {
      "tpu": ["xla", "flash", "splash"], "gpu": ["xla", "cudnn", "flash"]}.get(platform, ["xla"])
  seqs = [int(s) for s in (args.seqs or ("128,256" if on_cpu else "1024,2048,4096,8192,16384")).split(",")]
  heads = args.heads or (2 if on_cpu else 16)
  kv_heads = args.kv_heads or heads
  dtype = jnp.dtype(args.dtype)
  print(f"backend {platform} ({jax.devices()[0].device_kind}), batch {args.batch}, heads {heads}/{kv_heads} "
        f"(q/kv), {dtype.name}; median of {args.iters}")
  if on_cpu and not args.impls:
    print("CPU: xla reference only (flash on CPU is Pallas interpret mode; ask for it with --impls xla,flash)")
  head = f"{'seq':>6} {'d':>4} {'causal':>6} {'impl':>6} | {'fwd ms':>9} {'TFLOP/s':>8} {'÷xla':>6} " \
         f"{'÷cudnn':>6} {'MiB':>8} | {'f+b ms':>9} {'TFLOP/s':>8} {'÷xla':>6} {'÷cudnn':>6} {'MiB':>8}"
  print(head)
  print("-" * len(head))
  for causal in [c == "1" for c in args.causal.split(",")]:
    for d in [int(x) for x in args.head_dims.split(",")]:
      for t in seqs:
        keys = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(keys[0], (args.batch, t, heads, d), dtype)
        k = jax.random.normal(keys[1], (args.batch, t, kv_heads, d), dtype)
        v = jax.random.normal(keys[2], (args.batch, t, kv_heads, d), dtype)
        do = jax.random.normal(keys[3], (args.batch, t, heads, d), dtype)
        fwd_flops = 4 * args.batch * heads * t * t * d * (0.5 if causal else 1.0)
        base = {}  # (impl, kind) -> TFLOP/s
        for name in sorted(impls, key=lambda n: n != "xla" and n != "cudnn"):  # baselines first
          fn = impl_fn(name, causal, args)

          def train(q, k, v, fn=fn):  # forward + backward: gradients of <o, do>
            return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do),
                            argnums=(0, 1, 2))(q, k, v)

          cells = []
          for kind, f, flops in (("fwd", fn, fwd_flops), ("f+b", train, 3.5 * fwd_flops)):
            try:
              sec, mib = measure(f, (q, k, v), args.iters)
            except Exception as e:  # noqa: BLE001  an implementation unavailable here: say why, go on
              reason = str(e).splitlines()[0][:60] if str(e) else type(e).__name__
              cells.append(f"{'n/a':>9} {'':>8} {'':>6} {'':>6} {'':>8}")
              print(f"  ({name} {kind} t={t} d={d}: {type(e).__name__}: {reason})")
              continue
            tflops = flops / sec / 1e12
            base[name, kind] = tflops
            vs = [tflops / base[b, kind] if base.get((b, kind)) else float("nan") for b in ("xla", "cudnn")]
            cells.append(f"{sec * 1e3:9.2f} {tflops:8.3f} {vs[0]:6.2f} {vs[1]:6.2f} {mib:8.1f}")
          print(f"{t:>6} {d:>4} {str(causal):>6} {name:>6} | {cells[0]} | {cells[1]}")


if __name__ == "__main__":
  main()
