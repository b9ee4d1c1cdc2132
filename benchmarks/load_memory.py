"""Peak host memory of loading a Hugging Face checkpoint into an fsdp8 mesh, against a naive load.

Writes a random ~1B-parameter Llama in HF layout (the Llama 3.2 1B shapes with the vocabulary cut
to 32768: 1.04B parameters, tied embeddings; several safetensors shards and their index, written a
tensor at a time so this process never holds the model), then loads it in a fresh process per row
with 8 simulated CPU devices and prints each row's peak RSS growth (ru_maxrss at the end less the
resident set just before the load) over the checkpoint's bytes:

  jaxlm   jaxlm.interop.hf.load_model(dir, mesh=fsdp8): each device's slice read on its own
  naive   every tensor read whole (files kept open), converted, layers stacked, then jax.device_put
          onto the same shardings: what hf.load_model did before it read per shard

  python benchmarks/load_memory.py                        # bfloat16, ~2.1 GB, ~2 min on 2 cores
  python benchmarks/load_memory.py --dtype float32        # ~4.2 GB
  python benchmarks/load_memory.py --layers 4 --dir /tmp/small

The parameters are loaded in the checkpoint's dtype (load_model's dtype=), so the loaded model is as
large as the files and 1.0 is the floor; a bfloat16 checkpoint loaded into float32 master weights
(`--param_dtype float32`, the training default) has a floor of 2.0 by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dir", default="", help="checkpoint directory, kept for reruns (default "
                 "/tmp/jaxlm_load_memory_<dtype>_<layers>; delete it when done)")
  p.add_argument("--dtype", default="bfloat16", choices=tuple(SAFETENSORS_DTYPE))
  p.add_argument("--param_dtype", default="", choices=("", "float32", "bfloat16"),
                 help="parameter dtype of the loaded model (default: the checkpoint's)")
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--shard_mb", type=int, default=512, help="safetensors shard size")
  p.add_argument("--rows", default="naive,jaxlm", help="which loads to measure, in order")
  p.add_argument("--rewrite", action="store_true", help="write the checkpoint even if --dir has one")
  p.add_argument("--measure", default="", help=argparse.SUPPRESS)  # the child process: one row
  return p.parse_args(argv)


def hf_config(args) -> dict:
  """Llama 3.2 1B's config.json, vocabulary and depth from the flags."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab,
      "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": args.layers,
      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
      "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
      "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
      "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
      "torch_dtype": args.dtype,
  }


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  d, f, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
  q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
  shapes = {"model.embed_tokens.weight": (c["vocab_size"], d)}
  for i in range(c["num_hidden_layers"]):
    layer = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (q, d),
             "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
             "self_attn.o_proj.weight": (d, q), "post_attention_layernorm.weight": (d,),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
    shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
  shapes["model.norm.weight"] = (d,)
  return shapes


def write_checkpoint(path: str, args) -> None:
  """config.json, model-*.safetensors (at most --shard_mb each) and the index; each file's header is
  written first (the format puts every tensor's offsets there), then the tensors one by one."""
  import ml_dtypes
  dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(np.float32)
  config = hf_config(args)
  shapes = tensor_shapes(config)
  shards, size = [[]], 0
  for name, shape in shapes.items():
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if shards[-1] and size + nbytes > args.shard_mb * 2**20:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  weight_map = {}
  for i, names in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
      nbytes = int(np.prod(shapes[name])) * dtype.itemsize
      header[name] = {"dtype": SAFETENSORS_DTYPE[args.dtype], "shape": list(shapes[name]),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(os.path.join(path, file), "wb") as f:
      f.write(len(text).to_bytes(8, "little") + text)
      for name in names:
        shape = shapes[name]
        value = np.ones(shape, np.float32) if name.endswith("norm.weight") else (
            rng.standard_normal(shape, np.float32) * 0.02)
        f.write(value.astype(dtype).tobytes())
        weight_map[name] = file
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(int(np.prod(s)) * dtype.itemsize for s in shapes.values())},
               "weight_map": weight_map}, f, indent=1)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=1)


def _rss() -> int:
  """This process's resident set now, in bytes."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def naive_load(path: str, mesh, dtype):
  """Every tensor whole, layers stacked, the whole state device_put: hf.load_model before it read
  per shard (safetensors' flax reader, files open for the whole load)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from safetensors import safe_open

  from jaxlm.config import parse_rules
  from jaxlm.interop import hf
  from jaxlm.models import build_model
  from jaxlm.parallel.sharding import tree_shardings

  config = hf.read_config(path)
  config.compute.param_dtype = dtype
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config)), nnx.Param)
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    files = json.load(f)["weight_map"]
  handles = {}

  def read(name):
    file = os.path.join(path, files[name])
    if file not in handles:
      handles[file] = safe_open(file, framework="flax")
    return handles[file].get_tensor(name)

  values = {}
  for s in hf.tensor_sources(state, config.compute.scan_layers):
    layers = [s.layout.from_hf(read(name)) for name in s.names]
    value = jnp.stack(layers) if len(s.shape) > len(s.layout.shape) else layers[0]
    del layers
    target = values
    for key in s.path[:-1]:
      target = target.setdefault(key, {})
    target[s.path[-1]] = value.astype(s.dtype)
  nnx.replace_by_pure_dict(state, values)
  del values
  state = jax.device_put(state, tree_shardings(state, mesh, parse_rules(config.mesh.rules)))
  return nnx.merge(graphdef, state)


def measure(row: str, path: str, dtype: str) -> dict:
  """One row, in this (fresh) process: peak RSS growth of the load and its wall time."""
  import jax
  from flax import nnx

  from jaxlm.interop import hf
  from jaxlm.parallel.mesh import make_mesh

  config = hf.read_config(path)
  config.mesh.update(data=1, fsdp=8)
  config.train.batch_size = 8
  mesh = make_mesh(config)
  jax.block_until_ready(jax.device_put(np.zeros(8), jax.devices()[-1]))  # backend up
  before, start = _rss(), time.perf_counter()
  if row == "jaxlm":
    model, _ = hf.load_model(path, mesh=mesh, dtype=dtype)
  else:
    model = naive_load(path, mesh, dtype)
  params = nnx.state(model, nnx.Param)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  q = params["blocks"]["attn"]["q"][...]
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[1] == 2048 // 8
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
  return {"growth": peak - before, "seconds": seconds,
          "params": sum(x.size for x in jax.tree.leaves(params)),
          "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}


def main(argv=None):
  args = parse_args(argv)
  path = args.dir or f"/tmp/jaxlm_load_memory_{args.dtype}_{args.layers}"
  if args.measure:
    print(json.dumps(measure(args.measure, path, args.param_dtype or args.dtype)))
    return
  config_path = os.path.join(path, "config.json")
  fresh = False
  if os.path.exists(config_path):
    with open(config_path) as f:
      fresh = json.load(f) == hf_config(args)
  if args.rewrite or not fresh:
    start = time.perf_counter()
    write_checkpoint(path, args)
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
  files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
  ckpt = sum(os.path.getsize(os.path.join(path, f)) for f in files)
  print(f"checkpoint: {len(files)} safetensors files, {ckpt / 2**30:.2f} GiB ({args.dtype}); "
        f"loads into fsdp8 over 8 simulated CPU devices, parameters in {args.param_dtype or args.dtype}")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  print(f"| load | parameters | peak RSS growth | / checkpoint bytes | seconds |\n|---|---|---|---|---|")
  for row in args.rows.split(","):
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", row, "--dir", path,
           "--dtype", args.dtype, "--param_dtype", args.param_dtype or args.dtype]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
      raise SystemExit(f"{row} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| {row} | {r['params'] / 1e9:.2f}B | {r['growth'] / 2**30:.2f} GiB | "
          f"{r['growth'] / ckpt:.2f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
