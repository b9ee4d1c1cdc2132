"""Post-training: SFT and preference data, the losses and objectives the train step minimizes, and the arithmetic task the demos use."""
