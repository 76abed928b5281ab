"""Contrastive training: losses, optimiser, schedule and the training loop."""
