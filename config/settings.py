"""One settings class for both processes, read from RABBIT_ARCHIVE_* variables, files and .env."""

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from rabbit_archive.config.durations import parse_duration
from rabbit_archive.config.urls import join_hosts, split_hosts

ENV_PREFIX = "RABBIT_ARCHIVE_"
DEFAULT_SECRETS_DIR = "/run/secrets"


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable and never its secret."""


def mask_url(url: str) -> str:
    """Return the URL with its password replaced by ***, safe to log or print."""
    hosts = split_hosts(url)
    if len(hosts) > 1:
        return join_hosts([_mask_one(host) for host in hosts])
    return _mask_one(url)


def _mask_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    query = _PASSWORD_PARAMETER.sub(r"\1***", parts.query)
    if parts.password is None:
        return urlunsplit(parts._replace(query=query))
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}", query=query))


# libpq URLs may carry the password as a parameter too (?password=...).
_PASSWORD_PARAMETER = re.compile(r"((?:^|&)(?:password|sslpassword)=)[^&]*", re.IGNORECASE)


AMQP_URL_EXAMPLE = "amqp://user:password@host:5672/vhost (or amqps://)"


def check_amqp_url(value: str) -> str:
    """The value when it is an amqp:// or amqps:// URL with a host; else ValueError with an example."""
    return _check_url(value, ("amqp", "amqps"), AMQP_URL_EXAMPLE)


def url_vhost(url: str) -> str:
    """The vhost an AMQP URL names ('/' when its path is empty)."""
    path = urlsplit(split_hosts(url)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _check_url(value: str, schemes: tuple[str, ...], example: str, *, need_host: bool = True) -> str:
    # Several hosts (a cluster) are checked one by one.
    for one in split_hosts(value):
        try:
            parts = urlsplit(one)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError(f"must look like {example}") from None
        if parts.scheme not in schemes or (need_host and not parts.hostname):
            raise ValueError(f"must look like {example}")
    return value


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


CommaList = Annotated[tuple[str, ...], NoDecode]


class FileVariableSource(PydanticBaseSettingsSource):
    """Reads RABBIT_ARCHIVE_<NAME>_FILE: the value is the content of that file (Docker/K8s secrets)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        path = os.environ.get(f"{ENV_PREFIX}{field_name.upper()}_FILE")
        if not path:
            return None, field_name, False
        try:
            content = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(
                f"{ENV_PREFIX}{field_name.upper()}_FILE: cannot read {path}: {error.strerror}"
            ) from None
        return content.rstrip("\r\n"), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


class Settings(BaseSettings):
    """Everything the capture daemon and the replay tool are configured with."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        hide_input_in_errors=True,
    )

    # repr=False: printing the settings must never show a password.
    amqp_url: str = Field(default="amqp://guest:guest@localhost:5672/", repr=False)
    management_url: str = Field(default="http://localhost:15672", repr=False)
    management_ca_file: Path | None = None
    # Lets an amqps:// setup send AMQP_URL's password to a plain http:// management API.
    allow_plaintext_management_password: bool = False
    database_url: str = Field(default="postgresql://localhost/rabbit_archive", repr=False)
    vhosts: CommaList = ()
    queue: str = Field(default="rabbit-archive", min_length=1, max_length=255)
    queue_type: Literal["quorum", "classic"] = "quorum"
    single_active_consumer: bool = True
    queue_max_bytes: int | None = Field(default=None, gt=0)
    include: CommaList = ("*",)
    exclude: CommaList = ()
    binding_mode: Literal["all", "mirror"] = "all"
    source: Literal["bindings", "bindings+default", "firehose"] = "bindings"
    discovery_interval: float = Field(default=5.0, gt=0)
    # Where the rabbitmq_event_exchange plugin publishes (its `vhost` setting, "/" by default).
    event_vhost: str = "/"
    # `rabbit-replay run` without --yes: above this many messages the count is typed back, not y/n.
    replay_confirm_count_above: int = Field(default=10000, ge=0)
    # Publish replays into another broker or vhost (README "Incident replays"); the archive stays.
    replay_target_url: str | None = Field(default=None, repr=False)
    prefetch: int = Field(default=8000, ge=1, le=65535)
    batch_size: int = Field(default=4000, ge=1)
    batch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    # Bytes of unacknowledged deliveries the daemon aims to hold: prefetch shrinks for large messages.
    buffer_max_bytes: int = Field(default=128 * 1024 * 1024, ge=1)
    flush_interval: float = Field(default=0.2, gt=0)
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=9187, ge=0, le=65535)
    retention: timedelta | None = None
    partition_days_ahead: int = Field(default=3, ge=1)
    shutdown_grace: float = Field(default=8.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # The web console (`rabbit-replay web`): loopback only unless WEB_TOKEN guards it.
    web_host: str = Field(default="127.0.0.1", min_length=1)
    web_port: int = Field(default=9188, ge=0, le=65535)
    web_token: str | None = Field(default=None, repr=False)
    web_statement_timeout: float = Field(default=10.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            FileVariableSource(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    @field_validator("vhosts", "include", "exclude", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("queue", mode="after")
    @classmethod
    def _queue_fits_amqp(cls, value: str) -> str:
        # AMQP names are short strings: 255 bytes, and the ".dropped" queue needs 8 more.
        if len(value.encode("utf-8", "surrogateescape")) > 255 - len(".dropped"):
            raise ValueError("must be at most 247 bytes in UTF-8 (AMQP names hold 255, '.dropped' is added)")
        return value

    @field_validator("web_token", mode="after")
    @classmethod
    def _token_or_unset(cls, value: str | None) -> str | None:
        # An empty or blank token would let anyone in: it means "no token", so only loopback serves.
        return value.strip() or None if value is not None else None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        return _check_url(value, ("amqp", "amqps"), "amqp://user:password@host:5672/vhost (or amqps://)")

    @field_validator("replay_target_url")
    @classmethod
    def _replay_target_url(cls, value: str | None) -> str | None:
        # Empty means unset: replays publish through AMQP_URL.
        return check_amqp_url(value) if value is not None and value.strip() else None

    @field_validator("management_url")
    @classmethod
    def _management_url(cls, value: str) -> str:
        return _check_url(value, ("http", "https"), "http://host:15672 (or https://)").rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        # No host is fine: libpq then uses the local socket.
        return _check_url(
            value, ("postgresql", "postgres"), "postgresql://user@host:5432/database", need_host=False
        )

    @field_validator("include", mode="after")
    @classmethod
    def _include_default(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # An empty INCLUDE would silently capture nothing; unset and empty both mean "all".
        return value or ("*",)

    @field_validator("retention", mode="after")
    @classmethod
    def _positive_retention(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("must be a positive duration like 30d (unset keeps everything)")
        return value

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return None
            return parse_duration(value)
        return value

    @property
    def amqp_vhost(self) -> str:
        """The vhost named by AMQP_URL's path ('/' when the path is empty)."""
        path = urlsplit(self.amqp_url).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    @property
    def capture_vhosts(self) -> tuple[str, ...]:
        """The vhosts to capture; ('*',) means every vhost the management API lists."""
        return self.vhosts or (self.amqp_vhost,)

    @property
    def management_auth(self) -> tuple[str, str]:
        """Management API credentials: those in MANAGEMENT_URL, else those of AMQP_URL."""
        for url in (split_hosts(self.management_url)[0], split_hosts(self.amqp_url)[0]):
            parts = urlsplit(url)
            if parts.username is not None:
                return unquote(parts.username), unquote(parts.password or "")
        return "guest", "guest"

    def check_management_transport(self) -> None:
        """ConfigError when the management API would get AMQP_URL's password over plain http.

        Whoever chose amqps:// protects that password; copying it to an http:// MANAGEMENT_URL
        would send it in clear text (HTTP basic auth) on every discovery round.
        """
        amqp, management = urlsplit(self.amqp_url), urlsplit(self.management_url)
        if (
            amqp.scheme == "amqps"
            and amqp.username is not None
            and management.scheme == "http"
            and management.username is None
            and not self.allow_plaintext_management_password
        ):
            raise ConfigError(
                f"{ENV_PREFIX}MANAGEMENT_URL: http:// would send the password of the amqps:// "
                f"{ENV_PREFIX}AMQP_URL in clear text; use https:// for {ENV_PREFIX}MANAGEMENT_URL, "
                f"put credentials in {ENV_PREFIX}MANAGEMENT_URL, or set "
                f"{ENV_PREFIX}ALLOW_PLAINTEXT_MANAGEMENT_PASSWORD=true"
            )

    @property
    def management_base(self) -> str:
        """MANAGEMENT_URL without credentials (the first host of a cluster)."""
        return self.management_bases[0]

    @property
    def management_bases(self) -> list[str]:
        """MANAGEMENT_URL without credentials, one per host listed."""
        bases = []
        for one in split_hosts(self.management_url):
            parts = urlsplit(one)
            host = parts.hostname or ""
            if ":" in host:
                host = f"[{host}]"
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            bases.append(urlunsplit(parts._replace(netloc=host)))
        return bases

    def amqp_url_for(self, vhost: str) -> str:
        """AMQP_URL pointed at another vhost."""
        from urllib.parse import quote

        parts = urlsplit(self.amqp_url)
        return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def load_settings() -> Settings:
    """Build the settings from the environment, or raise ConfigError naming the bad variable."""
    secrets_dir: str | None = os.environ.get(f"{ENV_PREFIX}SECRETS_DIR")
    if secrets_dir and not Path(secrets_dir).is_dir():
        raise ConfigError(f"{ENV_PREFIX}SECRETS_DIR: {secrets_dir} is not a directory")
    if not secrets_dir and Path(DEFAULT_SECRETS_DIR).is_dir():
        secrets_dir = DEFAULT_SECRETS_DIR
    try:
        return Settings(_secrets_dir=secrets_dir)  # type: ignore[call-arg]
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "settings"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: {message}") from None
