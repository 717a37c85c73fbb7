"""The few RabbitMQ management API calls rabbit-archive makes, through httpx.

They need a user with the `management` tag and permissions (any) in each captured vhost;
a refusal becomes one AccessRefused line that says which of the two is missing.
"""

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx

from rabbit_archive.archive.errors import AccessRefused, BrokerUnavailable, UsageError
from rabbit_archive.config.settings import Settings

log = logging.getLogger(__name__)


class VhostRefused(AccessRefused):
    """The management API refused the user access to one vhost (others may be fine)."""


class ManagementClient(httpx.AsyncClient):
    """An httpx client that remembers which user it authenticates as (for error messages)."""

    user: str = ""
    # Every host of a MANAGEMENT_URL that names a cluster (base_url is the one in use).
    bases: list[str] = []  # noqa: RUF012 - set per instance by management_client


def management_client(settings: Settings) -> httpx.AsyncClient:
    """An HTTP client for MANAGEMENT_URL with the right credentials and CA."""
    verify: Any = str(settings.management_ca_file) if settings.management_ca_file else True
    client = ManagementClient(
        base_url=settings.management_base,
        auth=settings.management_auth,
        timeout=httpx.Timeout(10.0),
        verify=verify,
    )
    client.user = settings.management_auth[0]
    client.bases = settings.management_bases
    return client


def _vhost(vhost: str) -> str:
    return quote(vhost, safe="")


class ManagementApi:
    """Reads exchanges, bindings, policies, queues and vhosts of the broker."""

    def __init__(self, client: httpx.AsyncClient, on_request: Callable[[], None] | None = None) -> None:
        self._client = client
        self._on_request = on_request
        self._user = getattr(client, "user", "") or "?"
        self._policies_refused = False

    def _refused(self, path: str, response: httpx.Response, vhost: str | None) -> AccessRefused:
        """One line saying which right the management API found missing."""
        try:
            reason = str(response.json().get("reason") or "")
        except (ValueError, AttributeError):
            reason = ""
        user = self._user
        if reason == "Login failed":
            return AccessRefused(
                f"the management API at {self._client.base_url} rejected the credentials of user "
                f"{user!r}: check RABBIT_ARCHIVE_MANAGEMENT_URL (or the user of RABBIT_ARCHIVE_AMQP_URL)"
            )
        if reason == "Not management user":
            return AccessRefused(
                f"the management API refused user {user!r}: it needs the 'management' tag "
                f"(rabbitmqctl set_user_tags {user} management)"
            )
        if "virtual host" in reason and vhost is not None:
            return VhostRefused(
                f"the management API refused user {user!r} access to vhost {vhost!r}: give it "
                f"permissions there (rabbitmqctl set_permissions -p {vhost} {user} ...)"
            )
        return AccessRefused(
            f"the management API refused {path} to user {user!r} ({response.status_code}"
            f"{': ' + reason if reason else ''}): it needs the 'management' tag and permissions in the vhost"
        )

    async def _get(self, path: str, *, missing_ok: bool = False, vhost: str | None = None) -> Any:
        if self._on_request is not None:
            self._on_request()
        response = await self._request("GET", path)
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code in (401, 403):
            raise self._refused(path, response, vhost)
        if response.status_code >= 400:
            raise BrokerUnavailable(f"management API answered {response.status_code} to {path}")
        try:
            return response.json()
        except ValueError:
            raise BrokerUnavailable(
                f"management API answered {path} with something that is not JSON"
            ) from None

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; with several management hosts, the next is tried at once when one fails."""
        bases = getattr(self._client, "bases", None) or [str(self._client.base_url)]
        current = str(self._client.base_url).rstrip("/")
        order = sorted(bases, key=lambda base: base.rstrip("/") != current)
        error: httpx.HTTPError | None = None
        for base in order:
            try:
                response = await self._client.request(method, base.rstrip("/") + path, **kwargs)
            except httpx.TransportError as failed:
                error = failed
                continue
            except httpx.HTTPError as failed:
                error = failed
                break
            if base.rstrip("/") != current:
                self._client.base_url = httpx.URL(base)
            return response
        raise BrokerUnavailable(
            f"management API at {', '.join(order)} unreachable: {error!s}"
            " (is the rabbitmq_management plugin enabled?)"
        ) from None

    async def _objects(self, path: str, vhost: str | None) -> list[dict[str, Any]]:
        """A listing: a JSON array whose items are objects; odd items are dropped and logged.

        An answer that is not an array at all says nothing about the topology: it is an
        unavailable API for this round (BrokerUnavailable), never an empty broker.
        """
        listing = await self._get(path, vhost=vhost)
        if not isinstance(listing, list):
            raise BrokerUnavailable(
                f"management API answered {path} with {type(listing).__name__}, not a list"
            )
        objects = [item for item in listing if isinstance(item, dict)]
        if len(objects) != len(listing):
            log.warning(
                "management_odd_items",
                extra={"path": path, "dropped": len(listing) - len(objects)},
            )
        return objects

    async def exchanges(self, vhost: str) -> list[dict[str, Any]]:
        """Every exchange of the vhost, as the API lists them."""
        return await self._objects(f"/api/exchanges/{_vhost(vhost)}", vhost)

    async def bindings(self, vhost: str) -> list[dict[str, Any]]:
        """Every binding of the vhost."""
        return await self._objects(f"/api/bindings/{_vhost(vhost)}", vhost)

    async def policies(self, vhost: str) -> dict[str, dict[str, Any]]:
        """Policy name -> definition; empty when the user may not list policies."""
        try:
            items = await self._objects(f"/api/policies/{_vhost(vhost)}", vhost)
        except UsageError as error:
            # RabbitMQ 3.10 shows policies to 'management' users; where a version does not,
            # alternate exchanges set by policy go unnoticed: say so once.
            if not self._policies_refused:
                self._policies_refused = True
                log.warning(
                    "policies_unreadable",
                    extra={
                        "vhost": vhost,
                        "error": str(error),
                        "effect": "alternate exchanges set by policy are not detected",
                    },
                )
            return {}
        policies: dict[str, dict[str, Any]] = {}
        for item in items:
            name, definition = item.get("name"), item.get("definition")
            if isinstance(name, str):
                policies[name] = definition if isinstance(definition, dict) else {}
        return policies

    async def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        """One queue's details (depth, consumers), or None when it does not exist."""
        result = await self._get(
            f"/api/queues/{_vhost(vhost)}/{quote(name, safe='')}", missing_ok=True, vhost=vhost
        )
        return result if isinstance(result, dict) else None

    async def tracing(self, vhost: str) -> bool:
        """Whether the broker's firehose tracer is on for the vhost."""
        item = await self._get(f"/api/vhosts/{_vhost(vhost)}", vhost=vhost)
        return isinstance(item, dict) and item.get("tracing") is True

    async def set_tracing(self, vhost: str, on: bool) -> None:
        """Turn the firehose tracer on or off for the vhost (needs the 'administrator' tag)."""
        response = await self._request("PUT", f"/api/vhosts/{_vhost(vhost)}", json={"tracing": on})
        if response.status_code in (401, 403):
            raise AccessRefused(
                f"the management API refused to switch tracing for vhost {vhost!r}: SOURCE=firehose needs "
                "a user with the 'administrator' tag"
            )
        if response.status_code >= 400:
            raise BrokerUnavailable(f"management API answered {response.status_code} to switching tracing")

    async def overview(self) -> tuple[dict[str, Any], str | None]:
        """The broker's overview (versions, node) and the HTTP Date the API answered with."""
        if self._on_request is not None:
            self._on_request()
        response = await self._request("GET", "/api/overview")
        if response.status_code in (401, 403):
            raise self._refused("/api/overview", response, None)
        if response.status_code >= 400:
            raise BrokerUnavailable(f"management API answered {response.status_code} to /api/overview")
        try:
            overview = response.json()
        except ValueError:
            raise BrokerUnavailable(
                "management API answered /api/overview with something that is not JSON"
            ) from None
        return (overview if isinstance(overview, dict) else {}), response.headers.get("date")

    async def whoami(self) -> dict[str, Any]:
        """The authenticated user's name and tags."""
        item = await self._get("/api/whoami")
        return item if isinstance(item, dict) else {}

    async def vhosts(self) -> list[str]:
        """Names of every vhost."""
        items = await self._objects("/api/vhosts", None)
        return [item["name"] for item in items if isinstance(item.get("name"), str)]
