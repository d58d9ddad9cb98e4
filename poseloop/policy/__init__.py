"""Policy training: the trainer core, the algorithms, LoRA/ControlNet targets, exports and lineage."""
