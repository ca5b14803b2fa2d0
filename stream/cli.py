"""The ``promo`` command line. One entry point; each command's body lives in its own module.

Conventions (contract): commands that report print one JSON object on stdout with ``--json``; progress goes
to stderr; an error is one line on stderr (``promo: error: ...``) and a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from stream.errors import PromoError
from stream.settings import Settings

__all__ = ["PromoError", "cli", "emit", "main"]


def emit(report: dict, as_json: bool) -> None:
    """Print a command's report: one JSON object with ``--json``, else indented JSON for people."""
    if as_json:
        click.echo(json.dumps(report, separators=(",", ":"), default=str))
    else:
        click.echo(json.dumps(report, indent=2, default=str))


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic ValidationError: name the env var
        raise PromoError(f"invalid PROMO_* setting: {' '.join(str(exc).split())}") from exc


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PromoError as exc:
            click.echo(f"promo: error: {exc}", err=True)
            sys.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("promo: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
            sys.exit(0)
        except Exception as exc:  # last resort: still one line, never a traceback wall
            click.echo(f"promo: error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
def cli() -> None:
    """Streaming, real-time promotion engine."""


# --- embedded stack ---------------------------------------------------------------------------
@cli.group(cls=_Group)
def stack() -> None:
    """Start / stop / check the embedded Kafka-protocol broker and Redis (127.0.0.1 only)."""


@stack.command("up")
@click.option("--durable/--no-durable", default=None,
              help="Redis with its append-only file, fsynced at every write (the default, PROMO_DURABLE), or in "
                   "memory only: a Redis restart then loses the engine's state.")
@click.option("--json", "as_json", is_flag=True)
def stack_up(durable: bool | None, as_json: bool) -> None:
    """Start the broker and Redis that are not running, create the topics (idempotent)."""
    from stream import stack as st

    s = _settings()
    if durable is not None:
        s = s.model_copy(update={"durable": durable})
    emit(st.up(s), as_json)


@stack.command("down")
@click.option("--json", "as_json", is_flag=True)
def stack_down(as_json: bool) -> None:
    """Stop the broker and Redis this state directory started (Redis's file is kept)."""
    from stream import stack as st

    emit(st.down(_settings()), as_json)


@stack.command("status")
@click.option("--json", "as_json", is_flag=True)
def stack_status(as_json: bool) -> None:
    """Whether the broker and Redis answer; exit 1 when either does not."""
    from stream import stack as st

    report = st.status(_settings())
    emit(report, as_json)
    if not report["ok"]:
        sys.exit(1)


# --- worker, producer, demo --------------------------------------------------------------------
@cli.command()
def worker() -> None:
    """Run one Faust worker in the foreground (/metrics, /livez, /readyz on PROMO_WEB_PORT)."""
    from stream.app import run_worker

    run_worker(_settings())


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "rees46", "taobao"]), required=True)
@click.option("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
@click.option("--limit", type=int, default=None, help="stop after N source rows")
@click.option("--json", "as_json", is_flag=True)
def produce(file: Path, fmt: str, rate: float | None, limit: int | None, as_json: bool) -> None:
    """Replay FILE as event v1 to the events topic, keyed by user_id. Exit 1 when rows were skipped as
    unmappable or events were not delivered (the report says which), 0 when every row was sent."""
    from stream.produce import produce_file

    report = produce_file(_settings(), file, fmt, rate=rate, limit=limit)
    emit(report, as_json)
    if report["skipped"] or report["failed"]:
        click.echo(f"promo: error: {report['skipped']} of {report['rows']} rows skipped as unmappable, "
                   f"{report['failed']} events not delivered (see the report's errors)", err=True)
        sys.exit(1)


@cli.command()
@click.option("--rate", type=float, default=200.0, help="replay rate, events per second")
@click.option("--file", "file", type=click.Path(path_type=Path), default=None, help="replay this file instead")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "rees46", "taobao"]), default="rees46")
@click.option("--once", is_flag=True, help="exit when the replay is processed and print the summary as JSON")
def demo(rate: float, file: Path | None, fmt: str, once: bool) -> None:
    """Stack up, one worker, replay of the bundled REES46 sample, live summary. Ctrl-C stops everything."""
    from stream.demo import run_demo

    report = run_demo(_settings(), rate=rate, file=file, fmt=fmt, once=once)
    if report is not None:
        emit(report, True)
        if report["replay"].get("skipped") or report["replay"].get("failed"):
            sys.exit(1)  # --once: a replay that left rows out is not a clean run (stderr said which)


@cli.command()
@click.argument("user_id")
@click.option("--json", "as_json", is_flag=True)
def forget(user_id: str, as_json: bool) -> None:
    """Delete everything the engine holds about USER_ID.

    Exit status 0 also when the engine held nothing about the user: the report says "found": false and one line
    on stderr says so."""
    from stream.forget import forget_user

    emit(forget_user(_settings(), user_id), as_json)


# --- offline: evaluation and benchmarks ---------------------------------------------------------
@cli.command("tail")
@click.argument("kind", type=click.Choice(["decisions", "dlq", "events"]))
@click.option("--user", default=None, help="only this user's records (every topic is keyed by the user id)")
@click.option("--since", default=None, help="from this long ago (90s, 10m, 2h, 7d) or this ISO 8601 time")
@click.option("--follow", "-f", is_flag=True, help="keep reading new records until Ctrl-C")
@click.option("--limit", type=int, default=None, help="only the last N matching records (then follow)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per record")
def tail_cmd(kind: str, user: str | None, since: str | None, follow: bool, limit: int | None, as_json: bool) -> None:
    """Read the decisions, dead-letter or events topic as an operator (no consumer group: nothing committed)."""
    from stream.tail import run_tail

    try:
        run_tail(_settings(), kind, as_json=as_json, user=user, since=since, follow=follow, limit=limit)
    except KeyboardInterrupt:  # --follow ends with Ctrl-C: not an error
        pass


@cli.group(cls=_Group)
def dlq() -> None:
    """The dead-letter topic (PROMO_TOPIC_PREFIX.events.dlq); read it with `promo tail dlq`."""


@dlq.command("replay")
@click.option("--reason", "reasons", multiple=True,
              help="only records of this reason (repeatable or a comma list; default: every reason)")
@click.option("--since", default=None, help="only records written from this long ago (90s, 10m, 2h, 7d) or this "
                                            "ISO 8601 time")
@click.option("--dry-run", is_flag=True, help="send nothing; report what would be sent")
@click.option("--json", "as_json", is_flag=True)
def dlq_replay(reasons: tuple[str, ...], since: str | None, dry_run: bool, as_json: bool) -> None:
    """Send dead-lettered events back to the events topic (original bytes and key), e.g. after raising a limit.

    Safe to repeat: the engine counts an event it already applied as a duplicate. Tombstones, cut (truncated)
    records and second copies of an event are skipped and counted. Exit 1 when the broker did not acknowledge
    every send (the report's "failed"), 0 otherwise."""
    from stream.dlq_replay import run_replay

    report = run_replay(_settings(), reasons, since=since, dry_run=dry_run)
    emit(report, as_json)
    if report["failed"]:
        click.echo(f"promo: error: {report['failed']} of {report['selected']} records were not acknowledged by the "
                   f"broker (first: {report['send_errors'][0]}); run the replay again: applied events are "
                   "counted as duplicates", err=True)
        sys.exit(1)


@cli.group(cls=_Group)
def catalogue() -> None:
    """The offer catalogue (PROMO_CATALOGUE_PATH)."""


@catalogue.command("check")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def catalogue_check(file: Path, as_json: bool) -> None:
    """Validate a catalogue FILE as a worker would at start-up; errors name the file and line."""
    from models.policy.catalogue import CatalogueError
    from stream.catalogue import read_file

    try:
        loaded = read_file(file)  # one read: the version is of the bytes validated
    except CatalogueError as exc:
        raise PromoError(str(exc)) from None
    report = loaded.report()
    emit({"ok": True, "path": str(file), "version": report["version"], "offers": report["offers"],
          "budgets": report["budgets"]}, as_json)


@catalogue.command("apply")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def catalogue_apply(file: Path, as_json: bool) -> None:
    """Make FILE the catalogue of every running worker, without a restart: validated as `check` does (an invalid
    file is refused with its file:line, exit 2, nothing written), then stored in Redis, where each worker takes it
    up between two batches within one maintenance period (PROMO_MAINTENANCE_INTERVAL_S); /readyz and
    promo_catalogue_info show the version each decides with."""
    from stream.catalogue import apply_file

    emit(apply_file(_settings(), file), as_json)


# --- reading the engine's state (read-only) ------------------------------------------------------
@cli.group(cls=_Group)
def user() -> None:
    """What the engine holds about one user."""


@user.command("show")
@click.argument("user_id")
@click.option("--json", "as_json", is_flag=True)
def user_show(user_id: str, as_json: bool) -> None:
    """USER_ID's state now: profile, session, segment, p_buy, caps and offer history, open and recent decisions,
    closed decisions, and the items the engine would recommend now. Exit 1 when the engine holds nothing."""
    from stream.operate import user_show as show

    report = show(_settings(), user_id)
    emit(report, as_json)
    if not report["found"]:
        click.echo("promo: error: the engine holds no profile for this user (never seen, expired or forgotten)",
                   err=True)
        sys.exit(1)


@cli.command("explain")
@click.argument("decision_id")
@click.option("--user", "user_id", default=None,
              help="the decision's user (else the decisions topic is read to find it)")
@click.option("--json", "as_json", is_flag=True)
def explain_cmd(decision_id: str, user_id: str | None, as_json: bool) -> None:
    """Why DECISION_ID was made: every offer with its eligibility verdict, score and budget, the chosen one's
    probability, the largest contributions to p_buy, and the outcome once closed."""
    from stream.operate import explain, explain_lines

    out = explain(_settings(), decision_id, user_id)
    if as_json:
        emit(out, True)
    else:
        click.echo("\n".join(explain_lines(out)))


@cli.group(cls=_Group)
def ledger() -> None:
    """The closed decisions the engine keeps (PROMO_LEDGER_PER_USER per user)."""


@ledger.command("export")
@click.option("--since", default=None, help="closed this long ago or later (90s, 10m, 2h, 7d) or an ISO 8601 time")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="write here instead of stdout")
def ledger_export(since: str | None, output: Path | None) -> None:
    """Closed decisions as `promo evaluate policy` JSONL (context, action, propensity, reward), one per line;
    the counts go to stderr."""
    from stream.operate import ledger_export as export
    from stream.tail import parse_since

    since_ms = parse_since(since) if since else None
    if output is None:
        report = export(_settings(), click.echo, since_ms)
    else:  # written aside and moved onto --output whole: a failed export leaves an earlier file as it was
        part = output.with_name(output.name + ".part")
        try:
            with part.open("w") as fh:
                report = export(_settings(), lambda line: fh.write(line + "\n"), since_ms)
            os.replace(part, output)
        finally:
            part.unlink(missing_ok=True)
    click.echo(f"promo ledger export: {report['rows']} closed decisions {report['by_outcome']}", err=True)


@cli.group(cls=_Group)
def evaluate() -> None:
    """Offline evaluation (no broker)."""


@evaluate.command("stream")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "rees46", "taobao"]), required=True)
@click.option("--limit", type=int, default=None)
@click.option("--horizon-h", type=float, default=None, help="purchase-within-H horizon in hours")
@click.option("--json", "as_json", is_flag=True)
def evaluate_stream(file: Path, fmt: str, limit: int | None, horizon_h: float | None, as_json: bool) -> None:
    """Prequential (predict-then-learn) evaluation of models/ on an event log, vs baselines."""
    from stream.evaluate import evaluate_file

    emit(evaluate_file(file, fmt, limit=limit, horizon_h=horizon_h), as_json)


@evaluate.command("policy")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "obd"]), default="jsonl")
@click.option("--seed", type=int, default=0)
@click.option("--policy", "policies", type=click.Choice(["thompson", "rules"]), multiple=True,
              default=("thompson",), show_default=True,
              help="the worker's policy class to replay over the log, reported as policies.engine:<name> (repeatable)")
@click.option("--json", "as_json", is_flag=True)
def evaluate_policy(file: Path, fmt: str, seed: int, policies: tuple[str, ...], as_json: bool) -> None:
    """Off-policy evaluation (IPS, SNIPS, DR) on logged decisions."""
    from stream.evaluate import evaluate_policy_file

    if not file.exists():
        raise PromoError(f"{file}: no such file or directory")
    try:
        report = evaluate_policy_file(file, fmt=fmt, seed=seed, policies=policies,
                                      catalogue_path=_settings().catalogue_path)
    except ValueError as exc:  # PolicyDataError names <file>:<line>
        raise PromoError(str(exc)) from exc
    emit(report, as_json)


@cli.group(cls=_Group)
def bench() -> None:
    """Benchmarks; JSON on stdout, progress on stderr."""


@bench.command("core")
@click.option("--events", "n_events", type=int, default=200_000)
@click.option("--json", "as_json", is_flag=True)
def bench_core(n_events: int, as_json: bool) -> None:
    """models/ only, no broker: events/s of the batch API, numba vs pure Python, decision p50/p99."""
    from load_tests.bench_core import run

    emit(run(n_events=n_events), as_json)


@bench.command("pipeline")
@click.option("--events", "n_events", type=int, default=20_000)
@click.option("--rate", type=float, default=1000.0, help="offered rate for the latency run")
@click.option("--partitions", type=int, default=None,
              help="partitions of the benchmark's topics (default: PROMO_PARTITIONS)")
@click.option("--latency-s", type=float, default=15.0, show_default=True,
              help="length of each latency run: longer runs give a steadier p99 (about rate x 0.05 decisions a "
                   "second), and the embedded broker slows as it stores more")
@click.option("--json", "as_json", is_flag=True)
def bench_pipeline(n_events: int, rate: float, partitions: int | None, latency_s: float, as_json: bool) -> None:
    """Embedded stack: consume-only vs pass-through vs full engine; end-to-end latency at --rate, beside a
    minimal deciding agent's (the floor)."""
    from load_tests.bench_pipeline import run

    settings = _settings()
    if partitions is not None:
        if partitions < 1:
            raise PromoError(f"--partitions must be at least 1, got {partitions}")
        settings = settings.model_copy(update={"partitions": partitions})
    emit(run(settings, n_events=n_events, rate=rate, latency_s=latency_s), as_json)


def main() -> None:
    cli(prog_name="promo")


if __name__ == "__main__":
    main()
