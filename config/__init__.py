"""Settings of rabbit-archive, read from RABBIT_ARCHIVE_* environment variables."""

from config.durations import parse_duration
from config.settings import ConfigError, Settings, load_settings, mask_url

__all__ = ["ConfigError", "Settings", "load_settings", "mask_url", "parse_duration"]
