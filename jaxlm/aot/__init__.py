"""Ahead-of-time planning: compile the real train step for a TPU slice on a CPU machine."""
