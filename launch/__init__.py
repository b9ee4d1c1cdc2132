"""Launchers for multi-host jobs: Cloud TPU VMs (tpu_vm.py) and SLURM GPU clusters (slurm.py)."""
