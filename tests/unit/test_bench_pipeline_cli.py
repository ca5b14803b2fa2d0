"""``promo bench pipeline`` refuses bad options with one line and a non-zero exit, before it starts anything."""

import pytest
from click.testing import CliRunner

from stream.cli import cli


@pytest.mark.parametrize("args, message", [
    (["--latency-s", "0"], "--rate and --latency-s must be > 0, got 1000 and 0"),
    (["--rate", "-5"], "--rate and --latency-s must be > 0, got -5 and 15"),
    (["--partitions", "0"], "--partitions must be at least 1, got 0"),
    (["--events", "10"], "--events must be at least 100 to measure a rate, got 10"),
])
def test_bad_options_fail_in_one_line_before_any_stack_starts(args, message):
    res = CliRunner().invoke(cli, ["bench", "pipeline", *args, "--json"])
    assert res.exit_code != 0
    assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
