"""poseloop: a human-feedback loop for pose-conditioned image generation."""

__version__ = "0.1.0"
