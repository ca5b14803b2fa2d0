"""The Lua scripts of the Redis stores, one file each in ``models/state/lua/``, read once.

Each file starts with comments saying which keys and arguments the script takes, what it returns, and why it is
atomic the way it is.

>>> lua("reindex").splitlines()[0].startswith("-- KEYS: [profile]")
True
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def lua(name: str) -> str:
    """The source of ``models/state/lua/<name>.lua``."""
    return files("models.state").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
