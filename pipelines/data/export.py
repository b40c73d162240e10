"""Write the synthetic world as validated record folders (Parquet + manifest) that every later stage reads."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import records
from pipelines.data.world import SPLITS, World


def world_folders(root: str | Path) -> dict[str, Path]:
    """The folder of each dataset under a data root (stable names: later stages and users rely on them)."""
    root = Path(root)
    folders = {"documents": root / "documents", "tools": root / "tools"}
    for split in SPLITS:
        folders[f"questions/{split}"] = root / "questions" / split
        folders[f"tool_tasks/{split}"] = root / "tool_tasks" / split
    return folders


def _is_current(folder: Path, config: dict) -> bool:
    try:
        return records.read_manifest(folder).get("config") == config
    except records.RecordError:
        return False


def export_world(world: World, root: str | Path, config: dict) -> dict[str, int]:
    """Write each dataset unless a finished folder with the same world config is already there (reruns are free)."""
    folders = world_folders(root)
    rows_of = {
        "documents": ("document", world.documents),
        "tools": ("tool_spec", lambda: [{**t, "parameters": json.dumps(t["parameters"])} for t in world.tools()]),
    }
    for split in SPLITS:
        rows_of[f"questions/{split}"] = ("question", lambda s=split: world.questions(s))
        rows_of[f"tool_tasks/{split}"] = (
            "tool_task",
            lambda s=split: [{**t, "gold_calls": json.dumps(t["gold_calls"])} for t in world.tool_tasks(s)],
        )
    counts = {}
    for name, (kind, rows) in rows_of.items():
        folder = folders[name]
        if not _is_current(folder, config):
            records.write_records(rows(), folder, kind, config=config)
        counts[name] = records.read_manifest(folder)["count"]
    return counts
