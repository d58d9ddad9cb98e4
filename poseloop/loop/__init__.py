"""The loop's steps as the worker runs them: train the reward model, the policy, generate the next round, A/B."""
