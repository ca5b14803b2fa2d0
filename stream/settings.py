"""One settings object for the whole engine, read from ``PROMO_*`` environment variables.

Every process (worker, CLI, tests, benchmarks) builds a :class:`Settings` and passes it on explicitly;
nothing else reads the environment.

>>> s = Settings(_env_file=None, topic_prefix="shop1")
>>> s.topic_events, s.topic_decisions, s.topic_dlq
('shop1.events', 'shop1.decisions', 'shop1.events.dlq')
>>> Settings(kafka_bootstrap="127.0.0.1:19092").kafka_port
19092
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CATALOGUE = Path(__file__).resolve().parent.parent / "models" / "policy" / "default_offers.yaml"


class Settings(BaseSettings):
    """Engine configuration. Each field ``x`` is read from ``PROMO_X``."""

    # no infinite or NaN number anywhere: PROMO_REDIS_RETRY_S=inf would make the first transient error wait forever
    model_config = SettingsConfigDict(env_prefix="PROMO_", extra="ignore", allow_inf_nan=False)

    # --- connections ------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL (password inside)")
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL")
    kafka_sasl_mechanism: str | None = Field(None, description="PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    redis_ssl_ca_certs: str | None = None

    # --- topics -----------------------------------------------------------------------------
    topic_prefix: str = "promo"
    partitions: int = Field(12, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1)
    events_retention_s: int = Field(
        7 * 86400, ge=3600, description="retention of the events topic, set when it is created; also of the "
        "decisions and forget topics, which carry user ids too (Kafka retention.ms)",
    )
    dlq_retention_s: int = Field(
        30 * 86400, ge=3600, description="retention of the dead-letter topic, set when it is created: time to "
        "inspect and replay dead-lettered events (Kafka retention.ms)",
    )

    # --- worker -----------------------------------------------------------------------------
    app_id: str = "promo-engine"
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=1, le=65535)
    batch_max: int = Field(500, ge=1, description="max events per batch (stream.take_events)")
    batch_within_s: float = Field(0.005, gt=0, description="max wait to fill a batch, seconds")
    learn_behind: bool = Field(
        True, description="a batch's learning runs while the next batch is decided (at most one behind, in "
        "order); false: before the next batch is taken",
    )
    rebalance_timeout_s: float = Field(10.0, gt=0, description="consumer group rebalance timeout")
    fetch_max_wait_ms: int = Field(
        10, ge=1, le=1500,
        description="longest a fetch waits for data; Faust hard-codes 1,500 ms, which the embedded broker "
        "does not cut short when data arrives: it bounds decision latency",
    )
    session_timeout_s: float = Field(
        10.0, gt=0, le=90, description="a worker silent this long (e.g. kill -9) leaves the group; joins wait on it"
    )
    redis_retry_s: float = Field(
        0.5, gt=0, description="first pause before retrying a transient Redis or Kafka error; it doubles on each "
        "retry up to PROMO_RETRY_MAX_S"
    )
    retry_max_s: float = Field(5.0, gt=0, description="longest pause between two retries of a transient error")
    dlq_max_ratio: float = Field(
        0.01, gt=0, le=1, description="the worker stops instead of dead-lettering when the engine fails on more "
        "than this share of the last PROMO_DLQ_WINDOW schema-valid events (a bug or a broken dependency, not bad "
        "input); invalid input is not counted"
    )
    dlq_window: int = Field(1000, ge=1, description="schema-valid events the dead-letter ratio is taken over")
    dlq_max_consecutive: int = Field(
        50, ge=1, description="the worker stops when the engine fails on this many schema-valid events in a row"
    )
    shutdown_grace_s: float = Field(
        5.0, ge=0, description="on SIGTERM, how long a batch in progress may take to finish before the worker "
        "exits without acknowledging it (the group redelivers it); the whole stop, the final offset commit and "
        "leaving the group included, takes at most this plus 3 s, even with the broker or Redis gone"
    )
    log_level: str = "INFO"

    # --- embedded stack ---------------------------------------------------------------------
    state_dir: Path = Field(Path(".promo"), description="pid files, logs and Redis data of `promo stack`")
    durable: bool = Field(
        True, description="embedded Redis with its append-only file (appendfsync always), so the engine's state "
        "survives a Redis restart; false keeps it in memory only (lost with the process)"
    )

    # --- state ------------------------------------------------------------------------------
    redis_prefix: str = "promo"
    dedup_ttl_s: int = Field(7 * 86400, ge=60, description="how long event ids are remembered")
    profile_ttl_s: int = Field(90 * 86400, ge=60, description="idle time after which a profile expires")
    pseudonymise_key: SecretStr | None = Field(None, description="if set, user ids are keyed-hashed on ingestion")
    http_views_token: SecretStr | None = Field(
        None, description="if set, the worker serves read-only GET /users/<id> and /decisions/<id>?user=<id> on its "
        "web port to requests carrying 'Authorization: Bearer <token>' (off when unset)",
    )
    contrib_record_max_fields: int = Field(
        20_000, ge=0, description="most fields of a user's contribution record (what `promo forget` subtracts); "
        "a user whose contributions would go past it contributes nothing more to item statistics until the "
        "record expires or is forgotten (0: no cap)",
    )
    ledger_per_user: int = Field(
        50, ge=0, description="closed decisions kept per user, with context, action, propensity and reward, for "
        "`promo ledger export` and `promo explain` (0: none); they expire with the profile and `promo forget` "
        "removes them",
    )
    on_state_loss: Literal["stop", "reinit"] = Field(
        "stop", description="a worker that finds the Redis state lost (no epoch marker while its consumer group "
        "has committed offsets; stream/epoch.py): stop refuses to start with one line; reinit starts over on the "
        "empty state with an ERROR line, promo_state_reinitialised_total and a new epoch (set it for one start)"
    )

    # --- input limits (bad input goes to the DLQ) --------------------------------------------
    max_event_bytes: int = Field(16384, ge=256)
    max_string_len: int = Field(256, ge=8, description="max length of ids and other string fields")
    max_context_keys: int = Field(32, ge=0)
    max_price: float = Field(1_000_000.0, gt=0)
    max_quantity: int = Field(10_000, ge=1)
    min_ts_ms: int = Field(946_684_800_000, description="events before this (2000-01-01) are rejected")
    max_future_skew_s: int = Field(
        300, ge=0, description="events more than this after wall-clock now are rejected (DLQ, bad_timestamp). An "
        "event from the future has a wrong clock: NTP-synchronised devices and servers are seconds apart, while a "
        "wrong time zone is 15 min or more; accepted, it would time its user's cooldowns, caps and attribution "
        "windows by that clock. The engine's event-time clock never passes wall clock + this, so in live traffic "
        "no attribution window closes more than this early (models.clock)"
    )

    # --- policy -----------------------------------------------------------------------------
    catalogue_path: Path = DEFAULT_CATALOGUE
    holdout_pct: float = Field(5.0, ge=0, le=100)
    policy: Literal["thompson", "rules"] = Field(
        "thompson", description="thompson: the exploring policy that learns from every closed decision; rules: "
        "the catalogue's static expected margin, no exploration (with learning off, every decision is a "
        "function of the user's own events: two replays decide the same)"
    )
    decision_cooldown_s: int = Field(
        1800, ge=0, description="min event time between a decision and the next one at a cart, for a user (the "
        "catalogue's triggers.cart.cooldown_s, if set, wins)")
    triggers: str = Field(
        "", description="comma-separated triggers that are on (cart, post_purchase, retention, cart_abandonment, "
        "browse_abandonment; models.triggers); empty: the catalogue's triggers section decides (cart and every "
        "trigger it names without enabled: false)")
    attribution_window_s: int = Field(86_400, ge=60)
    recommend_k: int = Field(10, ge=1, le=100)
    purchase_horizon_h: float = Field(24.0, gt=0, description="propensity label: purchase within H hours")
    clock_idle_s: float = Field(
        300.0, gt=0, description="a partition without events for this long (wall clock) stops holding the engine's "
        "event-time clock back (models.clock), so one quiet partition cannot stop attribution windows from "
        "expiring; its events that arrive later than the clock then are late (README, event time and lateness). "
        "Keep it well above PROMO_MAINTENANCE_INTERVAL_S: other workers' partitions are refreshed at that period"
    )
    maintenance_interval_s: float = Field(
        15.0, gt=0, description="expiry sweep, budget refresh/sweep and quality gauges period"
    )
    snapshot_interval_s: float = Field(60.0, gt=0, description="how often models are snapshotted to Redis")
    relearn_max_events: int = Field(
        100_000, ge=0, description="after a restart, at most this many events per partition between the model "
        "snapshot and where consumption resumes are read back for the models to re-learn (the newest); "
        "0 turns reading back off"
    )
    learning: bool = Field(True, description="online learning core (similarity, propensity, segments) on")
    model_max_users: int = Field(
        200_000, ge=1000, description="users whose recent windows the in-memory models keep (the least recently "
        "seen evicted beyond), and decision points waiting for their purchase label (the oldest dropped beyond): "
        "bounds the worker's memory (README, known limitations: worker memory)"
    )
    similarity_max_neighbours: int = Field(
        50, ge=1, description="neighbours kept per item; beyond it the smallest pair counts are evicted, which "
        "makes the kept set depend on arrival order (item statistics are otherwise order-independent)"
    )
    seed: int = Field(
        0, description="seed of the learning core (kept for compatibility: since segments became fixed rules nothing "
        "in it is random; two workers learn alike from the same events)"
    )
    failpoint: str = Field(
        "", description="tests only: '<point>:<n>' makes the worker SIGKILL itself the n-th time a batch passes "
        "<point> (models.failpoints.POINTS); empty in production"
    )

    timer_resend_after_s: float = Field(
        30.0, gt=0, description="a timer-fired decision the sweep finds stored but not marked as sent (its worker "
        "died between commit and send) is sent again once it is this old (wall clock): younger, a batch or sweep "
        "may still be sending it. Keep it above a few PROMO_MAINTENANCE_INTERVAL_S")

    @field_validator("triggers")
    @classmethod
    def _valid_triggers(cls, v: str) -> str:
        from models.triggers import TRIGGERS

        unknown = sorted({n.strip() for n in v.split(",") if n.strip()} - set(TRIGGERS))
        if unknown:
            raise ValueError(f"unknown trigger(s) {unknown}; known: {', '.join(sorted(TRIGGERS))}")
        return v

    @property
    def trigger_names(self) -> list[str]:
        """``triggers`` as a list; empty: the catalogue decides (:func:`models.triggers.trigger_names`)."""
        return [n.strip() for n in self.triggers.split(",") if n.strip()]

    @field_validator("kafka_bootstrap")
    @classmethod
    def _host_ports(cls, v: str) -> str:
        for server in v.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"PROMO_KAFKA_BOOTSTRAP: {server.strip()!r} is not host:port (a comma-separated "
                                 "list of host:port, e.g. kafka-1:9092,kafka-2:9092)")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        if v.upper() not in ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"):
            raise ValueError(f"PROMO_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {v!r}")
        return v.upper()

    @field_validator("kafka_security_protocol")
    @classmethod
    def _security_protocol(cls, v: str) -> str:
        if v.upper() not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ValueError("PROMO_KAFKA_SECURITY_PROTOCOL must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL, "
                             f"got {v!r}")
        return v.upper()  # as aiokafka and Faust spell it

    @field_validator("pseudonymise_key")
    @classmethod
    def _key_not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        # an empty key (an unresolved ${SECRET} in a deployment) would silently keep user ids in the clear
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("PROMO_PSEUDONYMISE_KEY is set but empty: give the secret key, or unset the variable to "
                             "keep user ids in the clear")
        return v

    @model_validator(mode="after")
    def _retry_pauses(self) -> "Settings":
        if self.redis_retry_s > self.retry_max_s:
            raise ValueError(f"PROMO_REDIS_RETRY_S ({self.redis_retry_s:g} s), the first pause before a retry, is "
                             f"longer than PROMO_RETRY_MAX_S ({self.retry_max_s:g} s), the longest: raise "
                             "PROMO_RETRY_MAX_S or lower PROMO_REDIS_RETRY_S")
        return self

    @field_validator("failpoint")
    @classmethod
    def _valid_failpoint(cls, v: str) -> str:
        from models.failpoints import Failpoints

        Failpoints(v, action=lambda point: None)  # ValueError names the points
        return v

    # --- derived ----------------------------------------------------------------------------
    @property
    def topic_events(self) -> str:
        return f"{self.topic_prefix}.events"

    @property
    def topic_decisions(self) -> str:
        return f"{self.topic_prefix}.decisions"

    @property
    def topic_dlq(self) -> str:
        return f"{self.topic_prefix}.events.dlq"

    @property
    def topic_forget(self) -> str:
        return f"{self.topic_prefix}.forget"

    @property
    def all_topics(self) -> list[str]:
        return [self.topic_events, self.topic_decisions, self.topic_dlq, self.topic_forget]

    def topic_retention_ms(self, topic: str) -> int:
        """``retention.ms`` a topic is created with: :attr:`dlq_retention_s` for the DLQ, else
        :attr:`events_retention_s`.

        >>> s = Settings(_env_file=None)
        >>> s.topic_retention_ms(s.topic_events), s.topic_retention_ms(s.topic_dlq)
        (604800000, 2592000000)
        """
        return 1000 * (self.dlq_retention_s if topic == self.topic_dlq else self.events_retention_s)

    @property
    def kafka_host(self) -> str:
        return self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[0]

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def redis_url_safe(self) -> str:
        """The Redis URL with any password masked, for messages and logs.

        >>> Settings(_env_file=None, redis_url="rediss://user:pw@cache:6380/0").redis_url_safe
        'rediss://user:***@cache:6380/0'
        """
        u = urlparse(self.redis_url)
        if u.password is None:
            return self.redis_url
        netloc = f"{u.username or ''}:***@{u.hostname}" + (f":{u.port}" if u.port else "")
        return u._replace(netloc=netloc).geturl()

    @property
    def redis_host(self) -> str:
        return urlparse(self.redis_url).hostname or "127.0.0.1"

    @property
    def redis_port(self) -> int:
        return urlparse(self.redis_url).port or 6379

    def kafka_client_kwargs(self) -> dict:
        """Connection keyword arguments for aiokafka clients (security settings passed through)."""
        kw: dict = {"bootstrap_servers": self.kafka_bootstrap, "security_protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            kw["sasl_mechanism"] = self.kafka_sasl_mechanism
            kw["sasl_plain_username"] = self.kafka_sasl_username
            kw["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kw["ssl_context"] = create_ssl_context(
                cafile=self.kafka_ssl_cafile, certfile=self.kafka_ssl_certfile, keyfile=self.kafka_ssl_keyfile
            )
        return kw

    def to_env(self) -> dict[str, str]:
        """These settings as ``PROMO_*`` variables, to start a child process with the same configuration."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"PROMO_{name.upper()}"] = str(value)
        return env
