"""PPO on the addition model (configs/addition_pretrain.py): a value head (fresh) beside the
language model; each answer's exact-match score on its last token minus a per-token KL penalty to
the pretrained model (the reference), GAE advantages whitened over the rollout.

python -m jaxlm.train --config=configs/addition_pretrain.py     # the starting checkpoint
python -m jaxlm.train --config=configs/addition_ppo.py
python -m jaxlm.posttrain.addition --eval --workdir=runs/addition/ppo

Sampling, learning rate and schedule are those of configs/addition_grpo.py, with 256 prompts of
one completion each per rollout (PPO's baseline is the value head, not a group).

Measured on this project's idle 2-core CPU machine: held-out exact match
0.542 (from 0.370) in 97 s for the second command
(the third command prints the accuracy, which a rerun repeats; the time varies).
"""

from jaxlm.posttrain import addition_configs


def get_config():
  c = addition_configs.rl_config("ppo", data_dir="runs/addition/data", digits=2)
  p = c.posttrain
  p.group_size = 1
  p.temperature = 0.5
  p.updates_per_rollout = 1
  p.ppo_kl_coef = 0.05
  p.value_coef = 0.1
  t = c.train
  t.batch_size = 256
  t.steps = 400
  t.warmup_steps = 10
  t.learning_rate = 2e-4
  t.schedule = "cosine"
  t.log_every = 25
  t.eval_every = 50
  c.checkpoint.every = 100
  return c
