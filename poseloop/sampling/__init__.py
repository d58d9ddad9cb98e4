"""Samplers that record trajectories (DDIM, LCM) and a generation round that stores them."""
