"""`promo produce`: CLI errors (one line on stderr, non-zero exit), and the producer's logic against a fake
aiokafka producer (keys, partitions, headers, batching, counts, failures). The real-broker test lives in
tests/integration/."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from click.testing import CliRunner

from stream.cli import PromoError, cli
from stream.procs import free_port
from stream.produce import Pacer, _Errors, produce_events, produce_file
from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "stream" / "data" / "rees46_sample.csv"


def run_cli(args: list[str], env: dict | None = None):
    result = CliRunner().invoke(cli, args, env=env or {})
    return result


# --- CLI errors -------------------------------------------------------------------------------------------
def test_missing_file_is_one_line_on_stderr_and_exit_2(tmp_path):
    result = run_cli(["produce", str(tmp_path / "nope.csv"), "--format", "rees46", "--json"])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines == [f"promo: error: cannot read {tmp_path / 'nope.csv'}: no such file"]


def test_directory_is_an_error(tmp_path):
    result = run_cli(["produce", str(tmp_path), "--format", "jsonl"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"promo: error: cannot read {tmp_path}: it is a directory, expected a jsonl file"]


def test_unreachable_broker_names_the_setting_and_the_fix():
    port = free_port()  # nothing listens there any more
    result = run_cli(["produce", str(SAMPLE), "--format", "rees46", "--json"],
                     env={"PROMO_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"})
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"promo: error: cannot reach Kafka at 127.0.0.1:{port} (PROMO_KAFKA_BOOTSTRAP): ")
    assert line.endswith("start it with `promo stack up`")


def test_bad_rate_and_limit_are_errors_before_connecting():
    port = free_port()
    env = {"PROMO_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"}
    result = run_cli(["produce", str(SAMPLE), "--format", "rees46", "--rate", "0"], env=env)
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        "promo: error: --rate must be > 0 events per second, got 0.0"]
    result = run_cli(["produce", str(SAMPLE), "--format", "rees46", "--limit", "-1"], env=env)
    assert result.exit_code == 2 and "--limit must be >= 0" in result.stderr


def test_unknown_format_is_a_usage_error():
    result = run_cli(["produce", str(SAMPLE), "--format", "parquet"])
    assert result.exit_code == 2
    assert "parquet" in result.stderr


# --- a fake producer with aiokafka's batch interface --------------------------------------------------------
class FakeBatch:
    def __init__(self, cap: int, max_value: int) -> None:
        self.records: list[tuple] = []
        self.cap = cap
        self.max_value = max_value

    def append(self, *, timestamp, key, value, headers):
        if len(self.records) >= self.cap or len(value) > self.max_value:
            return None
        self.records.append((key, value, headers))
        return object()

    def record_count(self) -> int:
        return len(self.records)


class FakeCluster:
    def __init__(self, topics: dict[str, int]) -> None:
        self.topics = topics

    def partitions_for_topic(self, topic):
        n = self.topics.get(topic)
        return None if n is None else set(range(n))


class FakeProducer:
    """Records what would be sent; ``fail_partitions`` get a failed delivery future."""

    instances: list["FakeProducer"] = []

    def __init__(self, topics=None, batch_cap=50, max_value=10_000, fail_partitions=(),
                 fail_with=MessageSizeTooLargeError, **kwargs) -> None:
        self.fail_with = fail_with
        self.kwargs = kwargs
        self.client = type("C", (), {})()
        cluster = FakeCluster(topics or {"promo.events": 12})

        async def fetch_all_metadata():
            return cluster

        self.client.fetch_all_metadata = fetch_all_metadata
        self.batch_cap, self.max_value, self.fail_partitions = batch_cap, max_value, set(fail_partitions)
        self.sent: list[tuple[str, int, FakeBatch]] = []
        self.started = self.stopped = False
        FakeProducer.instances.append(self)

    async def start(self):
        self.started = True

    async def stop(self):
        self.stopped = True

    async def flush(self):
        pass

    def create_batch(self):
        return FakeBatch(self.batch_cap, self.max_value)

    async def send_batch(self, batch, topic, *, partition):
        self.sent.append((topic, partition, batch))
        fut = asyncio.get_running_loop().create_future()
        if partition in self.fail_partitions:
            fut.set_exception(self.fail_with("refused"))
        else:
            fut.set_result(None)
        return fut

    def records(self):
        return [(t, p, k, v, h) for t, p, b in self.sent for k, v, h in b.records]


def factory(**opts):
    FakeProducer.instances.clear()

    def make(**kwargs):
        return FakeProducer(**opts, **kwargs)

    return make


SETTINGS = Settings(_env_file=None)


def test_produce_file_report_and_messages(monkeypatch):
    monkeypatch.setattr("stream.produce.LINGER_S", 3600.0)  # batches ship when full, not by time
    report = produce_file(SETTINGS, SAMPLE, "rees46", progress=False, producer_factory=factory())
    assert report == {
        "file": str(SAMPLE), "format": "rees46", "rows": 2000, "sent": 2000, "skipped": 0, "failed": 0,
        "errors": [], "errors_total": 0, "elapsed_s": report["elapsed_s"],
        "events_per_s": report["events_per_s"], "topic": "promo.events",
    }
    (producer,) = FakeProducer.instances
    assert producer.started and producer.stopped
    assert producer.kwargs["bootstrap_servers"] == SETTINGS.kafka_bootstrap
    records = producer.records()
    assert len(records) == 2000
    partitioner = DefaultPartitioner()
    for topic, partition, key, value, headers in records:
        event = json.loads(value)
        assert topic == "promo.events"
        assert key == event["user_id"].encode()
        assert partition == partitioner(key, list(range(12)), list(range(12)))  # Kafka's default partitioner
        assert b" " not in value.split(b'"ts"')[0]  # compact JSON
        ((name, sent_at),) = headers
        assert name == "sent_at_ns" and int(sent_at) > 1_600_000_000 * 10**9
    # batched: several records per send, never more than the batch capacity
    sizes = [b.record_count() for _, _, b in producer.sent]
    assert max(sizes) == 50 and len(sizes) <= 2000 // 50 + 12
    # per-user order is the file order
    by_user: dict[bytes, list[str]] = {}
    for _, _, key, value, _ in records:
        by_user.setdefault(key, []).append(json.loads(value)["ts"])
    assert all(ts == sorted(ts) for ts in by_user.values())


def test_produce_file_reports_unmappable_rows_with_line_numbers(tmp_path, capsys):
    lines = ["1,2,3,pv,1511658000"] + [f"{i},2,3,like,1511658000" for i in range(30)] + ["9,2,3,buy,1511658001"]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(lines) + "\n")
    report = produce_file(SETTINGS, path, "taobao", producer_factory=factory())
    assert (report["rows"], report["sent"], report["skipped"], report["errors_total"]) == (32, 2, 30, 30)
    assert len(report["errors"]) == 20
    assert report["errors"][0] == {"line": 2, "error": 'unknown behavior_type "like" (expected pv, cart, buy, fav)'}
    assert [e["line"] for e in report["errors"]] == list(range(2, 22))
    err = capsys.readouterr()
    assert err.out == ""
    assert "30 unmappable rows skipped (first: line 2:" in err.err


def test_limit_counts_source_rows():
    report = produce_file(SETTINGS, SAMPLE, "rees46", limit=7, progress=False, producer_factory=factory())
    assert (report["rows"], report["sent"]) == (7, 7)


def test_jsonl_is_replayed_unchanged_including_invalid_events(tmp_path):
    docs = [{"user_id": "u1", "type": "teleport", "price": "abc"}, {"user_id": "u2", "ts": 1, "x": [1]}]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    produce_file(SETTINGS, path, "jsonl", progress=False, producer_factory=factory())
    values = [json.loads(r[3]) for r in FakeProducer.instances[0].records()]
    assert sorted(values, key=lambda d: d["user_id"]) == docs


def test_failed_deliveries_are_counted_not_hidden():
    result = asyncio.run(produce_events(
        SETTINGS, [{"user_id": f"u{i}", "event_id": str(i)} for i in range(200)], progress=False,
        producer_factory=factory(fail_partitions={0, 1, 2}),
    ))
    records = FakeProducer.instances[0].records()
    lost = sum(1 for _, p, *_ in records if p in {0, 1, 2})
    assert lost > 0
    assert (result["sent"], result["failed"]) == (200 - lost, lost)
    assert "MessageSizeTooLargeError" in result["send_errors"][0]


@pytest.mark.parametrize("error", [KafkaTimeoutError, KafkaConnectionError])
def test_broker_lost_mid_run_stops_with_one_clear_error(error):
    events = ({"user_id": f"u{i}"} for i in range(10_000))
    with pytest.raises(PromoError) as info:
        asyncio.run(produce_events(SETTINGS, events, progress=False,
                                   producer_factory=factory(fail_partitions={5}, fail_with=error)))
    msg = str(info.value)
    assert msg.startswith(f"lost Kafka at {SETTINGS.kafka_bootstrap} (PROMO_KAFKA_BOOTSTRAP) after ")
    assert error.__name__ in msg and "replay the same input" in msg and "\n" not in msg
    producer = FakeProducer.instances[0]
    assert producer.stopped
    assert len(producer.records()) < 10_000  # it stopped sending


def test_a_message_too_big_for_a_batch_fails_alone():
    events = [{"user_id": "u1", "pad": "x" * 20_000}, {"user_id": "u1", "event_id": "small"}]
    result = asyncio.run(produce_events(SETTINGS, events, progress=False, producer_factory=factory()))
    assert (result["sent"], result["failed"]) == (1, 1)
    assert "event 1: message of" in result["send_errors"][0]


def test_events_without_a_user_id_are_sent_without_key():
    result = asyncio.run(produce_events(SETTINGS, [{"x": 1}, {"user_id": 5}], progress=False,
                                        producer_factory=factory()))
    assert result["sent"] == 2
    assert [r[2] for r in FakeProducer.instances[0].records()] == [None, None]


def test_missing_topic_is_an_error_naming_it():
    with pytest.raises(PromoError, match=r"topic shop9\.events does not exist on .*PROMO_PARTITIONS=12"):
        asyncio.run(produce_events(Settings(_env_file=None, topic_prefix="shop9"), [{"user_id": "u"}],
                                   progress=False, producer_factory=factory()))
    assert FakeProducer.instances[0].stopped


def test_explicit_topic_and_partition_count():
    result = asyncio.run(produce_events(SETTINGS, [{"user_id": "u"}], progress=False, topic="other",
                                        producer_factory=factory(topics={"other": 3})))
    assert (result["topic"], result["partitions"], result["sent"]) == ("other", 3, 1)


# --- small pieces -------------------------------------------------------------------------------------------
def test_pacer_schedule():
    p = Pacer(rate=1000.0, start=100.0)
    assert p.wait_s(0, now=100.0) == 0.0
    assert p.wait_s(500, now=100.2) == pytest.approx(0.3)
    assert p.wait_s(500, now=101.0) == 0.0  # behind schedule: no sleep, catch up
    with pytest.raises(ValueError):
        Pacer(rate=-1.0, start=0.0)


def test_error_list_is_bounded_but_counts_everything():
    errors = _Errors(cap=3)
    for i in range(10):
        errors.append({"line": i})
    assert errors.total == 10 and [e["line"] for e in errors] == [0, 1, 2]


def test_linger_ships_batches_by_time(monkeypatch):
    monkeypatch.setattr("stream.produce.LINGER_S", 0.0)  # every batch is due at once
    result = asyncio.run(produce_events(SETTINGS, [{"user_id": f"u{i % 3}"} for i in range(30)], progress=False,
                                        producer_factory=factory()))
    assert result["sent"] == 30
    assert [b.record_count() for _, _, b in FakeProducer.instances[0].sent] == [1] * 30


def test_paced_run_sends_everything_in_order():
    events = [{"user_id": "u", "seq": i} for i in range(20)]
    result = asyncio.run(produce_events(SETTINGS, events, rate=20_000.0, progress=False, producer_factory=factory()))
    assert result["sent"] == 20
    assert [json.loads(r[3])["seq"] for r in FakeProducer.instances[0].records()] == list(range(20))


@pytest.mark.parametrize("skipped, failed, code", [(0, 0, 0), (3, 0, 1), (0, 2, 1)])
def test_the_exit_status_says_whether_every_row_was_sent(monkeypatch, tmp_path, skipped, failed, code):
    """Rows skipped as unmappable (or events the broker did not take) are visible in the exit status, not only in
    the report and on stderr."""
    report = {"file": "f", "format": "jsonl", "rows": 10, "sent": 10 - skipped - failed, "skipped": skipped,
              "failed": failed, "errors": [], "errors_total": skipped}
    monkeypatch.setattr("stream.produce.produce_file", lambda *a, **k: report)
    path = tmp_path / "f.jsonl"
    path.write_text("{}\n")
    result = run_cli(["produce", str(path), "--format", "jsonl", "--json"])
    assert result.exit_code == code, result.output
    assert json.loads(result.stdout) == report  # the report is printed either way
    if code:
        assert result.stderr.strip() == (f"promo: error: {skipped} of 10 rows skipped as unmappable, {failed} events "
                                         "not delivered (see the report's errors)")


def test_every_command_has_help_text():
    """`promo X --help` lists each subcommand with what it does (issue 16: `stack --help` listed bare names)."""
    import click

    def walk(group: click.Group, path: str):
        for name, cmd in group.commands.items():
            assert (cmd.help or "").strip(), f"`promo {path}{name}` has no help text"
            if isinstance(cmd, click.Group):
                walk(cmd, f"{path}{name} ")

    walk(cli, "")
