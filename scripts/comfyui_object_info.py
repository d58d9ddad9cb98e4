"""Save the node definitions of a running ComfyUI for the node types poseloop's workflows use (a test fixture).

    python main.py --cpu --listen 127.0.0.1 --port 8188      # in a ComfyUI checkout, with no models needed
    python scripts/comfyui_object_info.py --url http://127.0.0.1:8188

Writes tests/fixtures/comfyui_object_info.json: GET /object_info/<class> for each node type in
poseloop.policy.comfy_workflow.NODE_TYPES, with the ComfyUI and frontend versions from /system_stats.
tests/test_comfy_workflow.py checks every exported workflow against it; rerun this after a ComfyUI update.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poseloop.policy.comfy_workflow import NODE_TYPES  # noqa: E402
from poseloop.config.lib import field, parse_config  # noqa: E402
from poseloop.data.store import atomic_write  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "comfyui_object_info.json"


@dataclass
class ObjectInfoConfig:
    """Where the ComfyUI server runs and where the fixture goes."""

    url: str = field("http://127.0.0.1:8188", help="the running ComfyUI server")
    out: str = field(str(FIXTURE), help="the fixture file to write")
    commit: str = field("", help="the ComfyUI commit the server runs (recorded in the fixture)")
    note: str = field("", help="how the server was run (recorded in the fixture)")


def get(url: str) -> Any:
    """GET a JSON document."""
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def main(argv: Sequence[str] | None = None) -> int:
    """Fetch, write, print one line."""
    cfg, _ = parse_config(ObjectInfoConfig, {"default": ObjectInfoConfig}, "default", argv, description=__doc__,
                          prog="comfyui_object_info.py")
    base = cfg.url.rstrip("/")
    system = get(f"{base}/system_stats")["system"]
    nodes = {}
    for name in NODE_TYPES:
        info = get(f"{base}/object_info/{name}")
        if name not in info:
            print(f"error: {cfg.url} has no node type {name}", file=sys.stderr)
            return 2
        nodes[name] = info[name]
    doc = {"comfyui_version": system["comfyui_version"], "comfyui_commit": cfg.commit,
           "frontend_version": system.get("required_frontend_version", ""), "note": cfg.note,
           "source": "GET /object_info/<class> of a running ComfyUI (scripts/comfyui_object_info.py)",
           "nodes": nodes}
    atomic_write(Path(cfg.out), lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n"))
    print(f"wrote {cfg.out}: {len(nodes)} node types from ComfyUI {system['comfyui_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
