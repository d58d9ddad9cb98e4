"""Measurements shared by rewards, the world and evaluation: OKS, CLIP score, LPIPS, bootstrap intervals."""
