"""Configuration: the dataclass config mechanism and every command's config dataclasses and presets (a leaf)."""
