"""The few RabbitMQ management API calls rabbit-archive makes, through httpx."""

from typing import Any
from urllib.parse import quote

import httpx

from archive.errors import BrokerUnavailable, UsageError
from config.settings import Settings


def management_client(settings: Settings) -> httpx.AsyncClient:
    """An HTTP client for MANAGEMENT_URL with the right credentials and CA."""
    verify: Any = str(settings.management_ca_file) if settings.management_ca_file else True
    return httpx.AsyncClient(
        base_url=settings.management_base,
        auth=settings.management_auth,
        timeout=httpx.Timeout(10.0),
        verify=verify,
    )


def _vhost(vhost: str) -> str:
    return quote(vhost, safe="")


class ManagementApi:
    """Reads exchanges, bindings, policies, queues and vhosts of the broker."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def _get(self, path: str, *, missing_ok: bool = False) -> Any:
        try:
            response = await self._client.get(path)
        except httpx.HTTPError as error:
            raise BrokerUnavailable(
                f"management API at {self._client.base_url} unreachable: {error!s}"
                " (is the rabbitmq_management plugin enabled?)"
            ) from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code in (401, 403):
            raise UsageError(
                f"management API refused {path} ({response.status_code}): the user needs the "
                "'monitoring' tag (or 'management' with access to the vhost)"
            )
        if response.status_code >= 400:
            raise BrokerUnavailable(f"management API answered {response.status_code} to {path}")
        try:
            return response.json()
        except ValueError:
            raise BrokerUnavailable(
                f"management API answered {path} with something that is not JSON"
            ) from None

    async def exchanges(self, vhost: str) -> list[dict[str, Any]]:
        """Every exchange of the vhost, as the API lists them."""
        result: list[dict[str, Any]] = await self._get(f"/api/exchanges/{_vhost(vhost)}")
        return result

    async def bindings(self, vhost: str) -> list[dict[str, Any]]:
        """Every binding of the vhost."""
        result: list[dict[str, Any]] = await self._get(f"/api/bindings/{_vhost(vhost)}")
        return result

    async def policies(self, vhost: str) -> dict[str, dict[str, Any]]:
        """Policy name -> definition; empty when the user may not list policies."""
        try:
            items = await self._get(f"/api/policies/{_vhost(vhost)}")
        except UsageError:
            return {}
        return {item.get("name", ""): item.get("definition") or {} for item in items}

    async def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        """One queue's details (depth, consumers), or None when it does not exist."""
        result: dict[str, Any] | None = await self._get(
            f"/api/queues/{_vhost(vhost)}/{quote(name, safe='')}", missing_ok=True
        )
        return result

    async def vhosts(self) -> list[str]:
        """Names of every vhost."""
        items = await self._get("/api/vhosts")
        return [item["name"] for item in items if "name" in item]
