"""The layers hold: nothing in models/ imports stream/ or Faust (models/ is plain Python a benchmark or an
analyst runs without a broker; it reports metrics through an injected sink, models.metrics)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_models_import_neither_stream_nor_faust():
    bad = {str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.split(".")[0] in ("stream", "faust", "mode"))
           for p in (ROOT / "models").rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}
