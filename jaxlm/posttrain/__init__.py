"""Post-training: preference, reward-model and reinforcement-learning objectives on jaxlm models."""
