"""configs/shakespeare.py with mixture-of-experts MLPs of the same active size, for comparing the two.

python -m jaxlm.train --config=configs/shakespeare_moe.py

Every layer's SwiGLU 768 becomes 8 experts of SwiGLU 384 with top-2 softmax routing (Mixtral
style): a token passes through 2 x 384 = 768 hidden units, as in the dense model, so the active
parameters are the dense model's plus the 4 routers (4 x 256 x 8 = 8,192, 0.2%); in all 11.8M
parameters. Dropless dispatch (jax.lax.ragged_dot); load-balancing loss 0.01 and router z-loss
0.001. Everything else (data, schedule, steps) is the dense default's. Measured figures against it:
benchmarks/README.md, "MoE".
"""

from jaxlm import presets


def get_config():
  c = presets.load("shakespeare").get_config()
  m = c.model
  m.moe_num_experts, m.moe_experts_per_token, m.moe_mlp_dim = 8, 2, 384
  c.train.moe_balance_loss = 0.01
  c.train.moe_z_loss = 0.001
  c.train.workdir = "runs/shakespeare_moe"
  return c
