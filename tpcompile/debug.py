"""``TPCOMPILE_DUMP=DIR``: each stage writes its graph there as readable text."""

from __future__ import annotations

import os


def dump(name: str, text: str) -> None:
    """Write ``text`` to ``$TPCOMPILE_DUMP/name`` when that variable is set."""
    folder = os.environ.get("TPCOMPILE_DUMP")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name.replace("/", "_")), "w") as f:
            f.write(text)
