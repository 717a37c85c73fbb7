"""TLS passes through: amqps:// with a CA file, and an https management API with MANAGEMENT_CA_FILE."""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.test_cli import capture_command
from tests.acceptance.test_replay import json_lines, ok, replay_command
from tests.conftest import run_sql
from tests.support.daemon import CaptureProcess, wait_for
from tests.support.proxy import TcpProxy
from tests.support.services import Services
from tests.support.tls import Certificates, make_certificates

pytestmark = pytest.mark.acceptance


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path)


@pytest.fixture
def tls_endpoints(services: Services, certificates: Certificates) -> Iterator[tuple[int, int]]:
    """TLS-terminating proxies in front of the broker's AMQP port and its management API."""
    management_port = int(services.management_url.rsplit(":", 1)[1].strip("/"))
    context = certificates.server_context()
    with (
        TcpProxy(services.amqp_host, services.amqp_port, ssl=context) as amqps,
        TcpProxy(services.amqp_host, management_port, ssl=context) as https,
    ):
        yield amqps.port, https.port


def test_capture_and_replay_over_tls_with_a_private_ca(
    start_capture: Callable[..., CaptureProcess],
    capture_env: dict[str, str],
    tls_endpoints: tuple[int, int],
    certificates: Certificates,
    pika_channel: Any,
    vhost: str,
    database_url: str,
) -> None:
    amqps_port, https_port = tls_endpoints
    amqps_url = f"amqps://guest:guest@127.0.0.1:{amqps_port}/{vhost}?cafile={certificates.ca}"
    daemon = start_capture(
        amqp_url=amqps_url,
        management_url=f"https://127.0.0.1:{https_port}",
        management_ca_file=str(certificates.ca),
    )
    pika_channel.exchange_declare("secure", "fanout", durable=True)
    pika_channel.queue_declare("secure-copy", durable=True)
    daemon.wait_bound("secure")
    pika_channel.basic_publish("secure", "", b"over TLS")
    wait_for(
        lambda: run_sql(database_url, "SELECT count(*) FROM rabbit_archive.messages")[0][0] == 1,
        30,
        what="the message captured over amqps",
    )
    tls_env = {**capture_env, "RABBIT_ARCHIVE_AMQP_URL": amqps_url}
    ok(replay_command(tls_env, "run", "--exchange", "secure", "--to-queue", "secure-copy", "--yes"))
    wait_for(
        lambda: pika_channel.queue_declare("secure-copy", passive=True).method.message_count == 1,
        15,
        what="the replayed copy",
    )
    assert len(json_lines(ok(replay_command(tls_env, "history", "--json")))) == 1


def test_a_certificate_from_an_unknown_ca_is_refused_and_reported(
    start_capture: Callable[..., CaptureProcess], tls_endpoints: tuple[int, int], vhost: str
) -> None:
    _, https_port = tls_endpoints
    # No MANAGEMENT_CA_FILE: the proxy's certificate is not trusted. Discovery fails (and is
    # retried, as for any management outage) with one log line saying why; nothing crashes.
    daemon = start_capture(wait=False, management_url=f"https://127.0.0.1:{https_port}")
    wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in daemon.log(), 30, what="the refused certificate logged")
    assert daemon.process is not None
    assert daemon.process.poll() is None
    assert "Traceback" not in daemon.log()


def test_check_says_which_certificate_is_not_trusted_and_passes_with_the_ca(
    capture_env: dict[str, str], tls_endpoints: tuple[int, int], certificates: Certificates, vhost: str
) -> None:
    amqps_port, https_port = tls_endpoints
    untrusted = {
        **capture_env,
        "RABBIT_ARCHIVE_AMQP_URL": f"amqps://guest:guest@127.0.0.1:{amqps_port}/{vhost}",
        "RABBIT_ARCHIVE_MANAGEMENT_URL": f"https://127.0.0.1:{https_port}",
    }
    result = capture_command(untrusted, "check", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    failed = {
        item["check"]: item for item in json.loads(result.stdout)["findings"] if item["status"] == "fail"
    }
    assert "certificate verify failed" in failed["management_api"]["detail"]
    assert "RABBIT_ARCHIVE_MANAGEMENT_CA_FILE" in failed["management_api"]["fix"]
    assert "not trusted" in failed["broker"]["detail"]
    assert "cafile=" in failed["broker"]["fix"]
    trusted = {
        **untrusted,
        "RABBIT_ARCHIVE_AMQP_URL": f"{untrusted['RABBIT_ARCHIVE_AMQP_URL']}?cafile={certificates.ca}",
        "RABBIT_ARCHIVE_MANAGEMENT_CA_FILE": str(certificates.ca),
    }
    result = capture_command(trusted, "check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
