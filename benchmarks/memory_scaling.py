"""Per-device memory of parameters + optimizer state, by strategy and device count (compiled, not run).

For 1, 2, 4 and 8 simulated CPU devices and each strategy, builds the mesh from the config, compiles
jaxlm's real train step with the explicit shardings the loop uses, and reads XLA's
`compiled.memory_analysis()`: the state column is the step's argument bytes on one device less that
device's rows of the batch (= parameters + AdamW moments + step/RNG), "temp" is XLA's scratch for
activations and gradients. Nothing is allocated or run, so it takes a few seconds per row.

  python benchmarks/memory_scaling.py                     # default model below, ~2 min on 2 cores
  python benchmarks/memory_scaling.py --d_model 512 --layers 8

Strategies at n devices: dp (data=n), fsdp (fsdp=n, ZeRO-3), tp (tensor=n; heads, kv heads and
mlp must divide by n), fsdp_tp (fsdp=n/2 x tensor=2), sp (data=n/2 x sequence=2 where n >= 2).
Expect fsdp ~ 1/n of dp; tp shards only the head/MLP/vocab matrices (norm scales stay whole).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", default="1,2,4,8", help="device counts (at most 8 simulated)")
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=8)
  p.add_argument("--mlp", type=int, default=768)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=16)
  return p.parse_args(argv)


def strategies(n: int) -> dict[str, dict]:
  out = {"dp": dict(data=n), "fsdp": dict(data=1, fsdp=n), "tp": dict(data=1, tensor=n)}
  if n >= 2:
    out["fsdp_tp"] = dict(data=1, fsdp=n // 2, tensor=2)
    out["sp"] = dict(data=n // 2, sequence=2)
  return out


def main(argv=None):
  args = parse_args(argv)
  counts = [int(x) for x in args.devices.split(",")]
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={max(counts)}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax

  from jaxlm.config import ConfigError, base_config, validate
  from jaxlm.train.setup import abstract_state, jit_train_step, make_setup

  def config(mesh):
    c = base_config()
    c.model.update(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                   num_heads=args.heads, num_kv_heads=args.kv_heads, mlp_dim=args.mlp,
                   max_seq_len=args.seq)
    c.tokenizer.vocab_size = args.vocab
    c.data.seq_len = args.seq
    c.train.batch_size = args.batch
    c.mesh.update(**mesh)
    return validate(c)

  rows, base = [], None
  for n in counts:
    for name, mesh in strategies(n).items():
      c = config(mesh)
      try:
        setup = make_setup(c, jax.devices()[:n])
      except ConfigError as e:
        rows.append((n, name, None, None, None, str(e)[:60]))
        continue
      state = abstract_state(setup)
      batch = {k: jax.ShapeDtypeStruct((args.batch, args.seq), "int32", sharding=setup.batch_sharding)
               for k in ("inputs", "targets", "segment_ids", "positions", "weights")}
      compiled = jit_train_step(setup).lower(state, batch).compile()
      mem = compiled.memory_analysis()
      shape = setup.mesh.shape
      batch_bytes = 5 * 4 * args.batch * args.seq // (shape["data"] * shape["fsdp"] * shape["sequence"])
      state_bytes = mem.argument_size_in_bytes - batch_bytes
      base = state_bytes if base is None else base
      rows.append((n, name, state_bytes, state_bytes / base, mem.temp_size_in_bytes, ""))
      print(f"  compiled {name} on {n} device(s)", file=sys.stderr, flush=True)

  mib = 2 ** 20
  print(f"model: vocab {args.vocab}, d_model {args.d_model}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} kv), mlp {args.mlp}; batch {args.batch} x {args.seq}; float32, AdamW")
  print(f"{'devices':>7}  {'strategy':<8}  {'params+opt MiB/device':>21}  {'x of 1 device':>13}  "
        f"{'temp MiB/device':>15}")
  for n, name, state_bytes, ratio, temp, note in rows:
    if state_bytes is None:
      print(f"{n:>7}  {name:<8}  {'-':>21}  {'-':>13}  {'-':>15}  {note}")
    else:
      print(f"{n:>7}  {name:<8}  {state_bytes / mib:>21.2f}  {ratio:>13.3f}  {temp / mib:>15.2f}")


if __name__ == "__main__":
  main()
