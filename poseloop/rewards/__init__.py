"""Rewards: built-in, published, the learned reward model and its training."""
