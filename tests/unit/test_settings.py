"""Unit tests for config.settings and config.durations: RABBIT_ARCHIVE_* variables, files, .env, masking."""

import os
from datetime import timedelta
from pathlib import Path

import pytest

from rabbit_archive.config.durations import parse_duration
from rabbit_archive.config.settings import ConfigError, Settings, load_settings, mask_url

PREFIX = "RABBIT_ARCHIVE_"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RABBIT_ARCHIVE_* variable, no stray .env, no host secrets directory leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith(PREFIX):
            monkeypatch.delenv(name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    empty_secrets = tmp_path / "no-secrets"
    empty_secrets.mkdir()
    monkeypatch.setenv(f"{PREFIX}SECRETS_DIR", str(empty_secrets))


def load(monkeypatch: pytest.MonkeyPatch, **variables: str) -> Settings:
    for name, value in variables.items():
        monkeypatch.setenv(f"{PREFIX}{name}", value)
    return load_settings()


def config_error(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(monkeypatch, **variables)
    return str(caught.value)


# --- defaults -------------------------------------------------------------------------------


def test_defaults_match_the_documented_table(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch)
    assert settings.amqp_url == "amqp://guest:guest@localhost:5672/"
    assert settings.management_url == "http://localhost:15672"
    assert settings.database_url == "postgresql://localhost/rabbit_archive"
    assert settings.queue == "rabbit-archive"
    assert settings.queue_type == "quorum"
    assert settings.single_active_consumer is True
    assert settings.queue_max_bytes is None
    assert settings.include == ("*",)
    assert settings.exclude == ()
    assert settings.binding_mode == "all"
    assert settings.source == "bindings"
    assert settings.discovery_interval == 5
    assert settings.http_port == 9187
    assert settings.retention is None
    assert settings.log_level == "INFO"
    assert settings.log_format == "text"
    assert settings.capture_vhosts == ("/",)


def test_tuning_defaults_are_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch)
    assert 1 <= settings.prefetch <= 65535
    assert settings.batch_size >= 1
    assert settings.flush_interval > 0


@pytest.mark.parametrize(
    ("amqp_url", "vhost"),
    [
        ("amqp://guest:guest@localhost:5672", "/"),
        ("amqp://guest:guest@localhost:5672/", "/"),
        ("amqp://guest:guest@localhost:5672/%2F", "/"),
        ("amqp://guest:guest@localhost:5672/orders", "orders"),
        ("amqps://guest:guest@localhost:5671/team%2Fa%20b", "team/a b"),
    ],
)
def test_vhosts_default_to_the_amqp_url_vhost(
    monkeypatch: pytest.MonkeyPatch, amqp_url: str, vhost: str
) -> None:
    settings = load(monkeypatch, AMQP_URL=amqp_url)
    assert settings.amqp_vhost == vhost
    assert settings.capture_vhosts == (vhost,)


def test_explicit_vhosts_override_the_amqp_url_vhost(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, AMQP_URL="amqp://guest:guest@localhost/orders", VHOSTS="a, /,b")
    assert settings.capture_vhosts == ("a", "/", "b")
    assert load(monkeypatch, VHOSTS="*").capture_vhosts == ("*",)


# --- values from the environment ------------------------------------------------------------


def test_comma_lists_are_split_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch, INCLUDE=" orders.* , billing,,audit ", EXCLUDE="amq.*,internal.*")
    assert settings.include == ("orders.*", "billing", "audit")
    assert settings.exclude == ("amq.*", "internal.*")


def test_single_item_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch, EXCLUDE="amq.*").exclude == ("amq.*",)


def test_every_documented_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch,
        AMQP_URL="amqps://app:pw@rabbit.example:5671/prod",
        MANAGEMENT_URL="https://rabbit.example:15671/",
        DATABASE_URL="postgresql://archive@db.example:5433/archive",
        QUEUE="my-archive",
        QUEUE_TYPE="classic",
        SINGLE_ACTIVE_CONSUMER="false",
        QUEUE_MAX_BYTES="1048576",
        BINDING_MODE="mirror",
        SOURCE="firehose",
        DISCOVERY_INTERVAL="2.5",
        PREFETCH="100",
        BATCH_SIZE="50",
        FLUSH_INTERVAL="0.05",
        HTTP_PORT="9999",
        RETENTION="30d",
        LOG_LEVEL="debug",
        LOG_FORMAT="json",
    )
    assert settings.amqp_url == "amqps://app:pw@rabbit.example:5671/prod"
    assert settings.management_url == "https://rabbit.example:15671"
    assert settings.database_url == "postgresql://archive@db.example:5433/archive"
    assert settings.queue == "my-archive"
    assert settings.queue_type == "classic"
    assert settings.single_active_consumer is False
    assert settings.queue_max_bytes == 1048576
    assert settings.binding_mode == "mirror"
    assert settings.source == "firehose"
    assert settings.discovery_interval == 2.5
    assert settings.prefetch == 100
    assert settings.batch_size == 50
    assert settings.flush_interval == 0.05
    assert settings.http_port == 9999
    assert settings.retention == timedelta(days=30)
    assert settings.log_level == "DEBUG"
    assert settings.log_format == "json"


def test_empty_retention_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch, RETENTION="").retention is None


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PREFETCH", "many"),
        ("PREFETCH", "0"),
        ("PREFETCH", "70000"),
        ("BATCH_SIZE", "0"),
        ("HTTP_PORT", "70000"),
        ("HTTP_PORT", "port"),
        ("QUEUE_MAX_BYTES", "0"),
        ("DISCOVERY_INTERVAL", "0"),
        ("DISCOVERY_INTERVAL", "soon"),
        ("FLUSH_INTERVAL", "-1"),
        ("SINGLE_ACTIVE_CONSUMER", "maybe"),
        ("QUEUE", ""),
        ("QUEUE", "q" * 256),
        ("QUEUE_TYPE", "stream"),
        ("BINDING_MODE", "some"),
        ("SOURCE", "tap"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_FORMAT", "xml"),
        ("RETENTION", "forever"),
        ("RETENTION", "30"),
        ("AMQP_URL", "localhost:5672"),
        ("MANAGEMENT_URL", "localhost:15672"),
        ("DATABASE_URL", "localhost/rabbit_archive"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    message = config_error(monkeypatch, **{variable: value})
    assert message.startswith(f"{PREFIX}{variable}:")
    assert len(message) > len(f"{PREFIX}{variable}: ")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AMQP_URL", "http://user:s3cret@host/"),
        ("AMQP_URL", "amqp://user:s3cret@/vhost"),
        ("MANAGEMENT_URL", "amqp://user:s3cret@host:15672"),
        ("DATABASE_URL", "mysql://user:s3cret@host/db"),
    ],
)
def test_bad_url_error_never_shows_the_password(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    message = config_error(monkeypatch, **{variable: value})
    assert message.startswith(f"{PREFIX}{variable}:")
    assert "s3cret" not in message


def test_bad_url_from_a_file_never_shows_the_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "database_url"
    secret.write_text("mysql://user:s3cret@host/db\n", encoding="utf-8")
    message = config_error(monkeypatch, DATABASE_URL_FILE=str(secret))
    assert message.startswith(f"{PREFIX}DATABASE_URL:")
    assert "s3cret" not in message


# --- secrets from files ---------------------------------------------------------------------


def test_database_url_from_file_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text("postgresql://archive:s3cret@db/archive\n", encoding="utf-8")
    settings = load(monkeypatch, DATABASE_URL_FILE=str(secret))
    assert settings.database_url == "postgresql://archive:s3cret@db/archive"


def test_amqp_url_from_file_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "amqp_url"
    secret.write_text("amqp://app:s3cret@rabbit/orders\r\n", encoding="utf-8")
    settings = load(monkeypatch, AMQP_URL_FILE=str(secret))
    assert settings.amqp_url == "amqp://app:s3cret@rabbit/orders"
    assert settings.capture_vhosts == ("orders",)


def test_unreadable_file_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    message = config_error(monkeypatch, DATABASE_URL_FILE=str(tmp_path / "missing"))
    assert message.startswith(f"{PREFIX}DATABASE_URL_FILE:")


def test_environment_value_beats_file_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "database_url"
    secret.write_text("postgresql://from-file/archive\n", encoding="utf-8")
    settings = load(monkeypatch, DATABASE_URL="postgresql://from-env/archive", DATABASE_URL_FILE=str(secret))
    assert settings.database_url == "postgresql://from-env/archive"


@pytest.mark.parametrize("file_name", ["rabbit_archive_database_url", "RABBIT_ARCHIVE_DATABASE_URL"])
def test_database_url_from_secrets_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, file_name: str
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / file_name).write_text("postgresql://archive:s3cret@db/archive\n", encoding="utf-8")
    settings = load(monkeypatch, SECRETS_DIR=str(secrets))
    assert settings.database_url == "postgresql://archive:s3cret@db/archive"


def test_secrets_directory_file_without_prefix_is_not_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "database_url").write_text("postgresql://archive:s3cret@db/archive\n", encoding="utf-8")
    settings = load(monkeypatch, SECRETS_DIR=str(secrets))
    assert settings.database_url == "postgresql://localhost/rabbit_archive"


def test_environment_beats_secrets_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "rabbit_archive_database_url").write_text("postgresql://from-secret/db", encoding="utf-8")
    settings = load(monkeypatch, SECRETS_DIR=str(secrets), DATABASE_URL="postgresql://from-env/db")
    assert settings.database_url == "postgresql://from-env/db"


def test_missing_secrets_directory_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    message = config_error(monkeypatch, SECRETS_DIR=str(tmp_path / "nowhere"))
    assert message.startswith(f"{PREFIX}SECRETS_DIR:")


def test_secrets_directory_that_is_a_file_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("", encoding="utf-8")
    message = config_error(monkeypatch, SECRETS_DIR=str(not_a_dir))
    assert message.startswith(f"{PREFIX}SECRETS_DIR:")


# --- .env -----------------------------------------------------------------------------------


def test_dotenv_in_the_current_directory_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "RABBIT_ARCHIVE_QUEUE=from-dotenv\nRABBIT_ARCHIVE_INCLUDE=a.*,b.*\nUNRELATED=1\n", encoding="utf-8"
    )
    settings = load(monkeypatch)
    assert settings.queue == "from-dotenv"
    assert settings.include == ("a.*", "b.*")


def test_environment_beats_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "RABBIT_ARCHIVE_QUEUE=from-dotenv\nRABBIT_ARCHIVE_HTTP_PORT=1234\n", encoding="utf-8"
    )
    settings = load(monkeypatch, QUEUE="from-env")
    assert settings.queue == "from-env"
    assert settings.http_port == 1234


def test_bad_value_in_dotenv_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("RABBIT_ARCHIVE_PREFETCH=lots\n", encoding="utf-8")
    message = config_error(monkeypatch)
    assert message.startswith(f"{PREFIX}PREFETCH:")


# --- URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:s3cret@localhost:5672/orders", "amqp://guest:***@localhost:5672/orders"),
        ("amqp://guest:s3cret@localhost/", "amqp://guest:***@localhost/"),
        ("amqp://app:s3cret@[::1]:5672/%2F", "amqp://app:***@[::1]:5672/%2F"),
        ("postgresql://archive:s3cret@[2001:db8::7]/db", "postgresql://archive:***@[2001:db8::7]/db"),
        ("postgresql://archive:p%40ss%3Aw@db:5432/archive", "postgresql://archive:***@db:5432/archive"),
        ("https://admin:s3cret@rabbit:15671", "https://admin:***@rabbit:15671"),
    ],
)
def test_mask_url_hides_the_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest@localhost:5672/",
        "postgresql://localhost/rabbit_archive",
        "postgresql://[::1]:5432/rabbit_archive",
        "http://localhost:15672",
    ],
)
def test_mask_url_without_password_is_unchanged(url: str) -> None:
    assert mask_url(url) == url


def test_management_auth_falls_back_to_amqp_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch, AMQP_URL="amqp://app:p%40ss@rabbit/orders", MANAGEMENT_URL="http://rabbit:15672"
    )
    assert settings.management_auth == ("app", "p@ss")
    assert settings.management_base == "http://rabbit:15672"


def test_management_auth_prefers_management_url_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch,
        AMQP_URL="amqp://app:apppw@rabbit/orders",
        MANAGEMENT_URL="http://monitor:s3cret@rabbit:15672/",
    )
    assert settings.management_auth == ("monitor", "s3cret")
    # The base URL used for requests carries no credentials.
    assert settings.management_base == "http://rabbit:15672"


def test_management_auth_defaults_to_the_default_amqp_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch).management_auth == ("guest", "guest")


@pytest.mark.parametrize(
    ("vhost", "expected"),
    [
        ("/", "amqp://app:pw@rabbit:5672/%2F"),
        ("orders", "amqp://app:pw@rabbit:5672/orders"),
        ("team/a b", "amqp://app:pw@rabbit:5672/team%2Fa%20b"),
    ],
)
def test_amqp_url_for_encodes_the_vhost(monkeypatch: pytest.MonkeyPatch, vhost: str, expected: str) -> None:
    settings = load(monkeypatch, AMQP_URL="amqp://app:pw@rabbit:5672/other")
    assert settings.amqp_url_for(vhost) == expected


def test_amqp_url_for_round_trips_through_amqp_vhost(monkeypatch: pytest.MonkeyPatch) -> None:
    for vhost in ["/", "orders", "team/a b", "ü%x"]:
        url = load(monkeypatch, AMQP_URL="amqp://app:pw@rabbit/").amqp_url_for(vhost)
        assert load(monkeypatch, AMQP_URL=url).amqp_vhost == vhost


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("3d", timedelta(days=3)),
        ("1w", timedelta(weeks=1)),
        (" 30d ", timedelta(days=30)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "5", "abc", "-1h", "1y", "h", "1h30m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AMQP_URL", "amqp://user:s3cret@host:notaport/"),
        ("MANAGEMENT_URL", "http://user:s3cret@host:port/"),
        ("DATABASE_URL", "postgresql://user:s3cret@host:5x/db"),
    ],
)
def test_a_port_that_is_not_a_number_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    message = config_error(monkeypatch, **{variable: value})
    assert message.startswith(f"{PREFIX}{variable}:")
    assert "s3cret" not in message


def test_printing_the_settings_never_shows_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch,
        AMQP_URL="amqp://user:s3cret@host/",
        DATABASE_URL="postgresql://user:s3cret@db/archive",
        MANAGEMENT_URL="http://admin:s3cret@host:15672",
    )
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings)


def test_mask_url_hides_a_password_given_as_a_query_parameter() -> None:
    masked = mask_url("postgresql://user@db/archive?sslmode=require&password=s3cret")
    assert "s3cret" not in masked
    assert "sslmode=require" in masked


@pytest.mark.parametrize("value", ["0s", "0d"])
def test_zero_retention_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    assert config_error(monkeypatch, RETENTION=value).startswith(f"{PREFIX}RETENTION:")


def test_empty_include_means_every_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch, INCLUDE="").include == ("*",)


# --- the management password over plain http ----------------------------------------------


def test_amqps_password_is_not_sent_to_a_plain_http_management_api(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(
        monkeypatch, AMQP_URL="amqps://app:s3cret@rabbit:5671/prod", MANAGEMENT_URL="http://rabbit:15672"
    )
    with pytest.raises(ConfigError) as caught:
        settings.check_management_transport()
    message = str(caught.value)
    assert "\n" not in message
    assert "s3cret" not in message
    # It says how to fix it, all three ways.
    for fix in (
        "https://",
        "credentials in RABBIT_ARCHIVE_MANAGEMENT_URL",
        "ALLOW_PLAINTEXT_MANAGEMENT_PASSWORD=true",
    ):
        assert fix in message


@pytest.mark.parametrize(
    "variables",
    [
        # TLS on both.
        {"AMQP_URL": "amqps://app:pw@rabbit:5671/", "MANAGEMENT_URL": "https://rabbit:15671"},
        # Credentials of their own in MANAGEMENT_URL: the operator chose to send those.
        {"AMQP_URL": "amqps://app:pw@rabbit:5671/", "MANAGEMENT_URL": "http://monitor:m@rabbit:15672"},
        # Explicitly allowed.
        {
            "AMQP_URL": "amqps://app:pw@rabbit:5671/",
            "MANAGEMENT_URL": "http://rabbit:15672",
            "ALLOW_PLAINTEXT_MANAGEMENT_PASSWORD": "true",
        },
        # Plain AMQP: the password already travels in clear text.
        {"AMQP_URL": "amqp://app:pw@rabbit:5672/", "MANAGEMENT_URL": "http://rabbit:15672"},
        # No credentials in AMQP_URL: nothing of it is sent.
        {"AMQP_URL": "amqps://rabbit:5671/", "MANAGEMENT_URL": "http://rabbit:15672"},
        # The defaults.
        {},
    ],
)
def test_management_transport_accepted(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> None:
    load(monkeypatch, **variables).check_management_transport()


def test_allow_plaintext_management_password_defaults_to_false(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch).allow_plaintext_management_password is False
    assert config_error(monkeypatch, ALLOW_PLAINTEXT_MANAGEMENT_PASSWORD="maybe").startswith(
        "RABBIT_ARCHIVE_ALLOW_PLAINTEXT_MANAGEMENT_PASSWORD:"
    )


def test_a_queue_name_longer_than_amqp_allows_in_bytes_is_refused() -> None:
    from rabbit_archive.config.settings import Settings

    assert Settings(_env_file=None, queue="ж" * 123).queue == "ж" * 123  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="247 bytes"):
        Settings(_env_file=None, queue="ж" * 124)  # type: ignore[call-arg]


def test_urls_may_name_several_hosts_as_libpq_urls_do() -> None:
    from rabbit_archive.config.settings import Settings, mask_url
    from rabbit_archive.config.urls import host_of, join_hosts, split_hosts

    url = "amqp://u:s3cret@h1:5672,h2:5673,[::1]:5674/v%2F1"
    parts = split_hosts(url)
    assert parts == [
        "amqp://u:s3cret@h1:5672/v%2F1",
        "amqp://u:s3cret@h2:5673/v%2F1",
        "amqp://u:s3cret@[::1]:5674/v%2F1",
    ]
    assert join_hosts(parts) == url
    assert [host_of(part) for part in parts] == ["h1:5672", "h2:5673", "[::1]:5674"]
    assert mask_url(url) == "amqp://u:***@h1:5672,h2:5673,[::1]:5674/v%2F1"
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        amqp_url=url,
        management_url="http://m1:15672,m2:15673",
        database_url="postgresql://root@db1:5432,db2:5432/archive?target_session_attrs=read-write",
    )
    assert settings.amqp_vhost == "v/1"
    assert settings.management_bases == ["http://m1:15672", "http://m2:15673"]
    assert settings.management_auth == ("u", "s3cret")
    assert settings.amqp_url_for("other") == "amqp://u:s3cret@h1:5672,h2:5673,[::1]:5674/other"
    with pytest.raises(ValueError, match="must look like"):
        Settings(_env_file=None, amqp_url="amqp://h1:5672,h2:notaport/")  # type: ignore[call-arg]
