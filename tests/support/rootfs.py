"""Real programs copied into a tree with what they load: a container's rootfs (runc, Podman)
or a host seen under `--root` (doctor runs the tree's own binaries)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["copy_with_libraries"]

LDD_TIMEOUT = 30.0


def copy_with_libraries(root: Path, program: str, where: str | None = None) -> None:
    """`program` (a name on PATH, or a path) at `where` in `root` (default `/bin/<name>`),
    with the shared libraries and the loader `ldd` names, at the same paths under `root`."""
    source = Path(shutil.which(program) or program).resolve()
    target = root / (where or f"/bin/{program}").lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    listed = subprocess.run(
        ["ldd", str(source)], capture_output=True, text=True, timeout=LDD_TIMEOUT, check=True
    ).stdout
    for line in listed.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            copy = root / path.lstrip("/")
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(path).resolve(), copy)
