"""Write a diffusers folder as one .safetensors file in the original layout, for ComfyUI and A1111.

    python scripts/to_single_file.py --source models/my-sd15 --out ComfyUI/models/checkpoints/my-sd15.safetensors
    python scripts/to_single_file.py --source models/my-sd15/controlnet \
        --out ComfyUI/models/controlnet/my-sd15-controlnet.safetensors

A pipeline folder (unet/, vae/, text_encoder/, and text_encoder_2/ for SDXL) becomes a checkpoint for
*Load Checkpoint*; a ControlNet folder becomes a file for *Load ControlNet Model* (SD1.5: the layout of
control_v11p_sd15_openpose; SDXL: diffusers' keys, as SDXL ControlNets ship). An export's README gives the
exact command and file name its ComfyUI workflow expects. poseloop reads the file back too
(--model.base FILE / --model.controlnet FILE).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poseloop.config.lib import parse_config  # noqa: E402
from poseloop.cli import user_errors  # noqa: E402
from poseloop.models.original_layout import DTYPES, PRESETS, ConversionError, SingleFileConfig, write_single_file  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Convert, then print one line: what was written, where, how many tensors."""
    cfg, _ = parse_config(SingleFileConfig, PRESETS, "default", argv, description=__doc__, prog="to_single_file.py")
    with user_errors():
        try:
            what, count = write_single_file(cfg.source, cfg.out, DTYPES[cfg.dtype])
        except ConversionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    size = Path(cfg.out).expanduser().stat().st_size / 2**20
    print(f"wrote {cfg.out}: {what}, {count} tensors, {cfg.dtype}, {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
