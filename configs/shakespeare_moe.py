"""configs/shakespeare.py with mixture-of-experts MLPs of the same active size, for comparing the two.

python -m jaxlm.train --config=configs/shakespeare_moe.py

Every layer's SwiGLU 768 becomes 8 experts of SwiGLU 384, top-2: a token passes through 2 x 384 =
768 hidden units, as in the dense model, so the active parameters are the dense model's plus the 4
routers (4 x 256 x 8 = 8,192, 0.2%); 11.54M parameters in all. Sigmoid router with DeepSeek-V3's
bias balancing at rate 0.01 a step (softmax routing with a balance loss of 0.01 or 0.1 left one
expert of a layer with about 3x the mean load at step 30-50 of a 200-step run; the bias had it
falling), load-balancing loss 0.01 and router z-loss 0.001. Dropless dispatch (padded blocks on
CPU). Everything else (data, schedule, steps) is the dense default's. Measured figures against it:
benchmarks/README.md, "MoE".
"""

from jaxlm import presets


def get_config():
  c = presets.load("shakespeare").get_config()
  m = c.model
  m.moe_num_experts, m.moe_experts_per_token, m.moe_mlp_dim = 8, 2, 384
  m.moe_router = "sigmoid"
  c.train.moe_bias_rate = 0.01
  c.train.moe_balance_loss = 0.01
  c.train.moe_z_loss = 0.001
  c.train.workdir = "runs/shakespeare_moe"
  return c
