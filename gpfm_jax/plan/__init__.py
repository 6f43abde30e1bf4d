"""gpfm-plan: deviceless ahead-of-time compilation of the training step for TPU / GPU slices (docs/plan.md)."""
