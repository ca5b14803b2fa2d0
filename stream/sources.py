"""File sources: turn logged data into event v1 dicts, in file order, streaming (files may be big).

:func:`read_events` reads one of three formats (``.gz`` files are decompressed on the fly):

``jsonl``
    One JSON object per line, passed through *unchanged* (so invalid events can be replayed to exercise the
    DLQ). A line that is not a JSON object with a non-empty string ``user_id`` (the Kafka key) is unmappable.
``rees46``
    REES46 "eCommerce behavior data from multi category store" CSV, header
    ``event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session``
    (columns are found by header name; without a header this order is assumed).
    ``event_type`` view/cart/purchase/remove_from_cart -> same ``type``; ``item_id`` = product_id;
    ``category`` = category_code, or category_id when the code is empty; ``price``; ``session_id`` =
    user_session; ``ts`` = RFC 3339 (``2019-10-01 00:00:00 UTC`` -> ``2019-10-01T00:00:00Z``);
    ``context`` = ``{"brand": brand}`` when the brand is known.
``taobao``
    Taobao UserBehavior CSV ``user_id,item_id,category_id,behavior_type,timestamp`` (unix seconds; a header
    line with these names is recognised and skipped). ``pv`` -> ``view``, ``cart`` -> ``cart``, ``buy`` ->
    ``purchase``, ``fav`` (favourite) -> ``view`` with ``context {"behavior": "fav"}`` (event v1 has no
    favourite type; the context keeps it distinguishable). ``category`` = category_id, ``ts`` = epoch ms.
    Taobao has no prices.

Every CSV event gets a deterministic ``event_id`` = ``"<fmt>-" + blake2b(line number | raw line)``, so replaying
the same file is de-duplicated by the engine, and identical rows on different lines stay distinct events.

Unmappable rows are never skipped silently: each appends ``{"line": n, "error": "..."}`` to ``errors`` (line
numbers are 1-based physical lines, the header is line 1); with ``errors=None`` the first one raises
:class:`SourceError`. Blank lines are not rows. ``limit`` counts source rows (mappable or not), not lines.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "t.csv")
>>> _ = open(path, "w").write("1,10,100,pv,1511658000\\n2,20,200,fav,1511658001\\n3,30,300,jump,1511658002\\n")
>>> errors = []
>>> [(e["type"], e["user_id"], e["ts"], e.get("context")) for e in read_events(path, "taobao", errors=errors)]
[('view', '1', 1511658000000, None), ('view', '2', 1511658001000, {'behavior': 'fav'})]
>>> errors
[{'line': 3, 'error': 'unknown behavior_type "jump" (expected pv, cart, buy, fav)'}]
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import re
from pathlib import Path
from typing import IO, Iterator

FORMATS: tuple[str, ...] = ("jsonl", "rees46", "taobao")
REES46_COLUMNS: tuple[str, ...] = (
    "event_time", "event_type", "product_id", "category_id", "category_code", "brand", "price", "user_id",
    "user_session",
)
TAOBAO_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
REES46_TYPES = {"view": "view", "cart": "cart", "purchase": "purchase", "remove_from_cart": "remove_from_cart"}
TAOBAO_TYPES = {"pv": ("view", None), "cart": ("cart", None), "buy": ("purchase", None),
                "fav": ("view", {"behavior": "fav"})}

_REES46_TIME = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2}) ([0-9]{2}:[0-9]{2}:[0-9]{2}) UTC\Z")


class SourceError(ValueError):
    """An unmappable row (raised only when no ``errors`` list is given) or an unknown format."""


def event_id_for(fmt: str, line_no: int, raw_line: bytes) -> str:
    """Deterministic event id of a source row.

    >>> event_id_for("taobao", 2, b"1,10,100,pv,1511658000")
    'taobao-b7f3f4ed9f71fc3dce76a4c2'
    """
    h = hashlib.blake2b(b"%d|" % line_no + raw_line, digest_size=12).hexdigest()
    return f"{fmt}-{h}"


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_events(
    path: str | Path, fmt: str, limit: int | None = None, errors: list | None = None
) -> Iterator[dict]:
    """Yield event v1 dicts from ``path`` in file order (see the module docstring for the mappings).

    The file is opened now (so a missing file raises ``OSError`` here) and read lazily.
    """
    if fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise SourceError(f"limit must be >= 0, got {limit}")
    path = Path(path)
    f = _open(path)
    return _read(f, path, fmt, limit, errors)


def _split_csv(line: str) -> list[str]:
    if '"' in line:
        return next(csv.reader([line]))
    return line.split(",")


def _read(f: IO[bytes], path: Path, fmt: str, limit: int | None, errors: list | None) -> Iterator[dict]:
    rows = 0
    header_seen = False
    cols: dict[str, int] | None = None
    with f:
        for line_no, raw in enumerate(f, 1):
            if limit is not None and rows >= limit:
                return
            raw = raw.rstrip(b"\r\n")
            if line_no == 1:  # a UTF-8 byte order mark belongs to the file, not to the first field or line
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                rows += 1
                _error(errors, path, line_no, f"not valid UTF-8 at byte {exc.start}")
                continue
            if fmt == "jsonl":
                rows += 1
                event, err = _map_jsonl(line)
            else:
                fields = _split_csv(line)
                if not header_seen:
                    header_seen = True
                    cols = _header(fmt, fields)
                    if cols is not None:
                        continue  # the header is not a row
                    cols = _default_cols(fmt)
                rows += 1
                if fmt == "rees46":
                    event, err = _map_rees46(fields, cols, line_no, raw)
                else:
                    event, err = _map_taobao(fields, cols, line_no, raw)
            if err is not None:
                _error(errors, path, line_no, err)
                continue
            yield event


def _error(errors: list | None, path: Path, line_no: int, error: str) -> None:
    if errors is None:
        raise SourceError(f"{path}:{line_no}: {error}")
    errors.append({"line": line_no, "error": error})


def _header(fmt: str, fields: list[str]) -> dict[str, int] | None:
    """Column index by name if ``fields`` is a header line, else None."""
    names = [c.strip().lstrip("\ufeff").lower() for c in fields]
    wanted = REES46_COLUMNS if fmt == "rees46" else TAOBAO_COLUMNS
    if not set(wanted) <= set(names):
        return None
    return {c: names.index(c) for c in wanted}


def _default_cols(fmt: str) -> dict[str, int]:
    wanted = REES46_COLUMNS if fmt == "rees46" else TAOBAO_COLUMNS
    return {c: i for i, c in enumerate(wanted)}


def _map_jsonl(line: str) -> tuple[dict | None, str | None]:
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return None, f"not a JSON object: {exc}"
    if type(doc) is not dict:
        return None, f"not a JSON object (got {type(doc).__name__})"
    user_id = doc.get("user_id")
    if type(user_id) is not str or not user_id:
        return None, "no string user_id (needed as the Kafka key)"
    return doc, None


def _map_rees46(f: list[str], cols: dict[str, int], line_no: int, raw: bytes) -> tuple[dict | None, str | None]:
    if len(f) < len(cols) or len(f) <= max(cols.values()):
        return None, f"expected {len(REES46_COLUMNS)} columns, got {len(f)}"
    etype = REES46_TYPES.get(f[cols["event_type"]].strip())
    if etype is None:
        return None, (f"unknown event_type {json.dumps(f[cols['event_type']][:40])} "
                      f"(expected {', '.join(REES46_TYPES)})")
    user_id = f[cols["user_id"]].strip()
    item_id = f[cols["product_id"]].strip()
    if not user_id:
        return None, "empty user_id"
    if not item_id:
        return None, "empty product_id"
    m = _REES46_TIME.match(f[cols["event_time"]].strip())
    if m is None:
        return None, (f"event_time {json.dumps(f[cols['event_time']][:40])} is not "
                      f"'YYYY-MM-DD HH:MM:SS UTC'")
    event: dict = {
        "event_id": event_id_for("rees46", line_no, raw),
        "type": etype,
        "user_id": user_id,
        "item_id": item_id,
        "ts": f"{m.group(1)}T{m.group(2)}Z",
    }
    price_s = f[cols["price"]].strip()
    if price_s:
        try:
            price = float(price_s)
        except ValueError:
            return None, f"price {json.dumps(price_s[:40])} is not a number"
        if not math.isfinite(price):
            return None, f"price {json.dumps(price_s[:40])} is not a finite number"
        event["price"] = price
    category = f[cols["category_code"]].strip() or f[cols["category_id"]].strip()
    if category:
        event["category"] = category
    session = f[cols["user_session"]].strip()
    if session:
        event["session_id"] = session
    brand = f[cols["brand"]].strip()
    if brand:
        event["context"] = {"brand": brand}
    return event, None


def _map_taobao(f: list[str], cols: dict[str, int], line_no: int, raw: bytes) -> tuple[dict | None, str | None]:
    if len(f) < len(cols) or len(f) <= max(cols.values()):
        return None, f"expected {len(TAOBAO_COLUMNS)} columns, got {len(f)}"
    behavior = f[cols["behavior_type"]].strip()
    mapped = TAOBAO_TYPES.get(behavior)
    if mapped is None:
        return None, f"unknown behavior_type {json.dumps(behavior[:40])} (expected {', '.join(TAOBAO_TYPES)})"
    user_id = f[cols["user_id"]].strip()
    item_id = f[cols["item_id"]].strip()
    if not user_id:
        return None, "empty user_id"
    if not item_id:
        return None, "empty item_id"
    ts_s = f[cols["timestamp"]].strip()
    try:
        ts = int(ts_s)
    except ValueError:
        return None, f"timestamp {json.dumps(ts_s[:40])} is not an integer (unix seconds)"
    etype, context = mapped
    event: dict = {
        "event_id": event_id_for("taobao", line_no, raw),
        "type": etype,
        "user_id": user_id,
        "item_id": item_id,
        "ts": ts * 1000,
    }
    category = f[cols["category_id"]].strip()
    if category:
        event["category"] = category
    if context is not None:
        event["context"] = dict(context)
    return event, None
