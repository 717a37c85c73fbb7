"""URLs that may name several hosts, as libpq's do: `scheme://user:pass@h1:5672,h2:5672/path`.

AMQP_URL, MANAGEMENT_URL and DATABASE_URL may list the nodes of a cluster; the daemon and
the replay tool use the first that answers and move to the next when it goes away. Python's
urllib does not parse such a netloc (the port would be "5672,h2:5672"), so these helpers
split it into one URL per host, each with the same credentials, path and query.
"""

from urllib.parse import urlsplit, urlunsplit


def split_hosts(url: str) -> list[str]:
    """One URL per host, in the order given (a URL with one host gives itself)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if "," not in hosts:
        return [url]
    prefix = userinfo + at
    return [
        urlunsplit(parts._replace(netloc=prefix + host.strip())) for host in hosts.split(",") if host.strip()
    ]


def join_hosts(urls: list[str]) -> str:
    """The inverse of split_hosts: the hosts of single-host URLs in one netloc."""
    if len(urls) == 1:
        return urls[0]
    first = urlsplit(urls[0])
    userinfo, at, _ = first.netloc.rpartition("@")
    hosts = ",".join(urlsplit(url).netloc.rpartition("@")[2] for url in urls)
    return urlunsplit(first._replace(netloc=userinfo + at + hosts))


def host_of(url: str) -> str:
    """`host:port` of a single-host URL (for logs and status)."""
    return urlsplit(url).netloc.rpartition("@")[2]
