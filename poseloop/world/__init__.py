"""The embedded pose world: renderer, keypoint detector, its training, LCM and preview distillation, quality checks."""
