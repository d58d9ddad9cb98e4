"""Evaluation: baseline vs candidate on shared prompts, poses and seeds, and its report."""
