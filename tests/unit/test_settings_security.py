"""Security settings pass through from PROMO_* variables to aiokafka, Faust and redis-py."""

from __future__ import annotations

import ssl

import faust

from stream.app import _credentials
from stream.settings import Settings


def test_sasl_ssl_reaches_aiokafka_and_faust(monkeypatch):
    monkeypatch.setenv("PROMO_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PROMO_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("PROMO_KAFKA_SASL_USERNAME", "promo")
    monkeypatch.setenv("PROMO_KAFKA_SASL_PASSWORD", "s3cret")
    s = Settings(_env_file=None)
    kw = s.kafka_client_kwargs()
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_username"] == "promo" and kw["sasl_plain_password"] == "s3cret"
    assert isinstance(kw["ssl_context"], ssl.SSLContext)
    cred = _credentials(s)
    assert isinstance(cred, faust.SASLCredentials) and cred.mechanism.name.replace("_", "-") == "SCRAM-SHA-512"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump(mode="json"))


def test_plaintext_by_default_and_secrets_never_printed():
    s = Settings(_env_file=None, redis_url="rediss://:pw@cache:6380/0", pseudonymise_key="k" * 16)
    assert _credentials(s) is None
    assert s.kafka_client_kwargs() == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert "k" * 16 not in repr(s)
    assert s.to_env()["PROMO_PSEUDONYMISE_KEY"] == "k" * 16  # children get the real value


def test_redis_password_is_masked_in_messages():
    s = Settings(_env_file=None, redis_url="redis://:hunter2@127.0.0.1:1/0")
    from stream.forget import forget_user
    from stream.errors import PromoError
    import pytest

    with pytest.raises(PromoError) as e:
        forget_user(s, "u1")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)


async def test_worker_consumer_fetch_wait_follows_the_setting():
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from stream.app import make_app
    from models.engine import Engine
    from models.state.engine_memory import MemoryStore

    app = make_app(Settings(_env_file=None, fetch_max_wait_ms=7), engine=Engine(MemoryStore()))
    thread = faust_aiokafka.AIOKafkaConsumerThread(app.consumer)
    consumer = thread._create_worker_consumer(app.transport)
    assert consumer._fetch_max_wait_ms == 7
    await consumer._client.close()


def test_an_empty_pseudonymisation_key_is_refused_not_taken_for_off(monkeypatch):
    """``PROMO_PSEUDONYMISE_KEY=${SECRET}`` with the secret unresolved is an empty string: taken as "no key", the
    worker would keep clear user ids in Redis while the operator believes they are pseudonymised."""
    import pydantic
    import pytest

    for empty in ("", "   "):
        monkeypatch.setenv("PROMO_PSEUDONYMISE_KEY", empty)
        with pytest.raises(pydantic.ValidationError, match="PROMO_PSEUDONYMISE_KEY is set but empty"):
            Settings(_env_file=None)
    monkeypatch.delenv("PROMO_PSEUDONYMISE_KEY")
    assert Settings(_env_file=None).pseudonymise_key is None


def test_retry_pauses_that_the_back_off_cannot_take_are_refused_at_start(monkeypatch):
    """A first retry pause above the longest one passed the settings and failed every batch at its first retry;
    an infinite one waited forever. Both are refused when the settings are read, naming the variables."""
    import pydantic
    import pytest

    monkeypatch.setenv("PROMO_REDIS_RETRY_S", "10")
    with pytest.raises(pydantic.ValidationError, match="PROMO_REDIS_RETRY_S .* PROMO_RETRY_MAX_S"):
        Settings(_env_file=None)
    monkeypatch.setenv("PROMO_RETRY_MAX_S", "30")
    assert Settings(_env_file=None).redis_retry_s == 10.0
    for bad in ("inf", "nan"):
        monkeypatch.setenv("PROMO_REDIS_RETRY_S", bad)
        with pytest.raises(pydantic.ValidationError, match="finite"):
            Settings(_env_file=None)


def test_connection_settings_that_would_fail_later_are_refused_when_read(monkeypatch):
    """A bootstrap entry without its port passed the settings and the preflight, then stopped the worker with an
    IndexError; a misspelt log level or security protocol failed only when the worker started. Each is refused
    when the settings are read, naming the variable; the protocol is normalised to the case aiokafka expects."""
    import pydantic
    import pytest

    for var, bad in (("PROMO_KAFKA_BOOTSTRAP", "kafka"), ("PROMO_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2"),
                     ("PROMO_KAFKA_BOOTSTRAP", "kafka:port"), ("PROMO_LOG_LEVEL", "verbose"),
                     ("PROMO_KAFKA_SECURITY_PROTOCOL", "TLS")):
        monkeypatch.setenv(var, bad)
        with pytest.raises(pydantic.ValidationError, match=var):
            Settings(_env_file=None)
        monkeypatch.delenv(var)
    monkeypatch.setenv("PROMO_KAFKA_BOOTSTRAP", "kafka-1:9092, kafka-2:9093")
    monkeypatch.setenv("PROMO_KAFKA_SECURITY_PROTOCOL", "sasl_ssl")
    s = Settings(_env_file=None)
    assert s.kafka_port == 9092 and s.kafka_security_protocol == "SASL_SSL"
    assert isinstance(s.kafka_client_kwargs()["ssl_context"], ssl.SSLContext)
