"""Post-training: supervised fine-tuning and preference data, and the arithmetic task the demos use."""
