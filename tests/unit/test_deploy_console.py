"""The web console in the deployment files: an optional Compose service and a Kubernetes Deployment,
each probed on /healthz, guarded by a token, locked down like the daemon (see test_deploy.py)."""

from typing import Any

from tests.unit.test_deploy import ENV_PREFIX, compose, of_kind, pod_spec


def test_compose_console_is_optional_token_guarded_and_probed() -> None:
    services = compose()["services"]
    console = services["console"]
    assert console["profiles"] == ["console"], "not started by a plain `up`"
    assert console["entrypoint"] == ["rabbit-replay"]
    assert console["command"] == ["web"]
    environment = console["environment"]
    assert environment[f"{ENV_PREFIX}WEB_HOST"] == "0.0.0.0"
    assert environment[f"{ENV_PREFIX}WEB_TOKEN"], "any address but loopback needs the token"
    port = environment[f"{ENV_PREFIX}WEB_PORT"]
    assert console["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(console["healthcheck"]["test"])
    assert console["depends_on"]["capture"] == {"condition": "service_healthy"}
    assert console["read_only"] is True
    assert console["cap_drop"] == ["ALL"]


def console_container() -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "rabbit-console"]
    (container,) = pod_spec(deployment)["containers"]
    return deployment, container


def test_kubernetes_console_is_probed_on_healthz_and_locked_down() -> None:
    deployment, container = console_container()
    assert container["command"] == ["rabbit-replay"]
    assert container["args"] == ["web"]
    (port,) = container["ports"]
    assert port["name"] == "web"
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "web"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "web"}
    context = {**pod_spec(deployment)["securityContext"], **container["securityContext"]}
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["limits"]["memory"]
    secrets = {d["metadata"]["name"]: d for d in of_kind("Secret")}
    configmaps = {d["metadata"]["name"]: d for d in of_kind("ConfigMap")}
    sources = container["envFrom"]
    (secret,) = [secrets[s["secretRef"]["name"]] for s in sources if "secretRef" in s]
    (config,) = [configmaps[s["configMapRef"]["name"]] for s in sources if "configMapRef" in s]
    assert set(secret["stringData"]) == {f"{ENV_PREFIX}DATABASE_URL", f"{ENV_PREFIX}WEB_TOKEN"}
    assert config["data"][f"{ENV_PREFIX}WEB_HOST"] == "0.0.0.0"
    assert int(config["data"][f"{ENV_PREFIX}WEB_PORT"]) == port["containerPort"]
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == "rabbit-console"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "web"
