"""Command-line edges: a file's byte order mark, damaged .gz files, an output file kept when an export fails, a
closed pipe, infinite options. Each prints one line and exits as documented."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from stream.cli import cli
from stream.sources import read_events

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "stream" / "data" / "rees46_sample.csv"


def test_a_byte_order_mark_is_not_part_of_the_first_field_of_a_file_without_header(tmp_path):
    """Taobao's UserBehavior files have no header: with a BOM the first event's user was '\\ufeff1', silently."""
    path = tmp_path / "tb.csv"
    path.write_bytes(b"\xef\xbb\xbf1,10,100,pv,1511658000\n2,20,200,cart,1511658001\n")
    assert [e["user_id"] for e in read_events(path, "taobao")] == ["1", "2"]


def test_a_damaged_gz_file_is_one_line_naming_it(tmp_path):
    whole = gzip.compress(SAMPLE.read_bytes())
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(whole[: len(whole) * 4 // 5])
    corrupt = tmp_path / "bad.csv.gz"
    corrupt.write_bytes(whole[:20] + bytes(200) + whole[220:])
    for path in (truncated, corrupt):
        result = CliRunner().invoke(cli, ["evaluate", "stream", str(path), "--format", "rees46", "--json"])
        assert result.exit_code == 2, result.output
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("promo: error")]
        assert str(path) in line and "damaged" in line


def test_an_infinite_horizon_is_refused_as_an_option():
    result = CliRunner().invoke(cli, ["evaluate", "stream", str(SAMPLE), "--format", "rees46", "--horizon-h", "inf"])
    assert result.exit_code == 2 and "--horizon-h must be a finite number > 0" in result.stderr


def test_a_failed_ledger_export_leaves_the_earlier_output_file_as_it_was(tmp_path):
    out = tmp_path / "ledger.jsonl"
    out.write_text('{"earlier": "export"}\n')
    result = CliRunner().invoke(cli, ["ledger", "export", "-o", str(out)],
                                env={"PROMO_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code != 0 and result.stderr.startswith("promo: error")
    assert out.read_text() == '{"earlier": "export"}\n' and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`promo ... | head -1`: the pipe closes before the output is written; the command stops without an error."""
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "catalogue", "check",
                             "models/policy/default_offers.yaml", "--json"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # before the interpreter has even imported the command
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"error" not in err.lower(), err
