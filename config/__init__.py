"""Settings of rabbit-archive, read from RABBIT_ARCHIVE_* environment variables."""

from rabbit_archive.config.durations import parse_duration
from rabbit_archive.config.settings import ConfigError, Settings, load_settings, mask_url

__all__ = ["ConfigError", "Settings", "load_settings", "mask_url", "parse_duration"]
