"""Training: the run (loop), one epoch and validation (engine), optimiser, RNG state, DDP."""
