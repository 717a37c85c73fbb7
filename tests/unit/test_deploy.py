"""The deployment files in deploy/: linted, schema-valid, using only known variables, and buildable.

Docker, Kubernetes and systemd do not run here; what can be checked without them is: hadolint on
the Dockerfile and its build stage replayed in a fresh virtual environment, the Compose file
against the Compose specification's schema, the Kubernetes manifests against Kubernetes' own
schemas (kubernetes-validate ships them), the systemd unit with `systemd-analyze verify`, and every
RABBIT_ARCHIVE_* name they set against the settings class.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from rabbit_archive.config.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
KUBERNETES_FILES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# Kubernetes versions the manifests must be valid for: an old supported one and the newest known.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources whose schema is not part of Kubernetes (checked by hand below).
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
FIELDS = {name.upper() for name in Settings.model_fields}


def unknown_variables(names: set[str]) -> set[str]:
    """The RABBIT_ARCHIVE_* names that no setting reads (NAME, NAME_FILE and SECRETS_DIR are read)."""
    unknown = set()
    for name in names:
        assert name.startswith(ENV_PREFIX), name
        suffix = name.removeprefix(ENV_PREFIX)
        if suffix == "SECRETS_DIR" or suffix in FIELDS:
            continue
        if suffix.endswith("_FILE") and suffix.removesuffix("_FILE") in FIELDS:
            continue
        unknown.add(name)
    return unknown


# ---- systemd ---------------------------------------------------------------------------------


def read_environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments, optional quotes)."""
    values = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, separator, value = line.partition("=")
        assert separator, f"not KEY=VALUE: {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def unit_values(key: str) -> list[str]:
    """Every value of KEY= in the systemd unit."""
    unit = (DEPLOY / "systemd/rabbit-capture.service").read_text()
    return re.findall(rf"^{key}=(.*)$", unit, flags=re.MULTILINE)


def test_systemd_environment_file_names_only_known_variables() -> None:
    names = set(read_environment_file(DEPLOY / "systemd/rabbit-archive.env"))
    assert {f"{ENV_PREFIX}AMQP_URL", f"{ENV_PREFIX}DATABASE_URL"} <= names
    assert unknown_variables(names) == set()


def test_systemd_environment_file_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [key for key in os.environ if key.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in read_environment_file(DEPLOY / "systemd/rabbit-archive.env").items():
        monkeypatch.setenv(key, value)
    Settings(_env_file=None)  # type: ignore[call-arg]


def test_systemd_unit_reads_that_file_and_runs_the_daemon() -> None:
    assert unit_values("EnvironmentFile") == ["/etc/rabbit-archive/rabbit-archive.env"]
    assert len(unit_values("ExecStart")) == 1
    assert re.fullmatch(r"/\S+/rabbit-capture run", unit_values("ExecStart")[0])


def test_systemd_unit_restarts_on_failure_and_is_hardened() -> None:
    expected = {
        "Restart": "on-failure",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert unit_values(key) == [value], key
    # The daemon stops within SHUTDOWN_GRACE (8 s by default), well inside the stop timeout.
    assert int(unit_values("TimeoutStopSec")[0]) > Settings.model_fields["shutdown_grace"].default


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (package systemd) is needed to check the unit"
    unit = (DEPLOY / "systemd/rabbit-capture.service").read_text()
    # verify checks that ExecStart's program exists: point it at this environment's.
    unit = re.sub(r"^ExecStart=\S+/rabbit-capture", f"ExecStart={BIN}/rabbit-capture", unit, flags=re.M)
    copy = tmp_path / "rabbit-capture.service"
    copy.write_text(unit)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


# ---- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM ... [AS name] block of a Dockerfile: its instructions as (keyword, arguments)."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for word, arguments in self.instructions if word == keyword]


def dockerfile_instructions(text: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, backslash continuations joined."""
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.partition(" ")
        yield keyword.upper(), arguments.strip()
        logical = ""
    assert not logical, "dangling line continuation"


def dockerfile_stages() -> list[Stage]:
    """The stages of deploy/Dockerfile, with global ARG defaults substituted in FROM lines."""
    arguments: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in dockerfile_instructions((DEPLOY / "Dockerfile").read_text()):
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            arguments[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base, name))
        else:
            stages[-1].instructions.append((keyword, rest))
    return stages


def env_pairs(arguments: str) -> dict[str, str]:
    """ENV A=1 B="two words" -> {"A": "1", "B": "two words"}."""
    return dict(word.split("=", 1) for word in shlex.split(arguments))


def test_dockerfile_passes_hadolint() -> None:
    labels = ("title", "description", "version", "revision", "licenses")
    required = [f"--require-label=org.opencontainers.image.{label}:text" for label in labels]
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", *required, str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_final_stage_is_slim_non_root_and_runs_the_daemon() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    build, final = stages[0], stages[-1]
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base
    # Nothing is compiled or installed with a package manager in the final stage.
    for run in final.all("RUN"):
        assert not re.search(r"apt-get|apt |apk |gcc|build-essential|pip ", run), run
    assert f"--from={build.name} /opt/rabbit-archive /opt/rabbit-archive" in final.all("COPY")
    (user,) = final.all("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert re.fullmatch(r"\d+:\d+", user), "numeric, so Kubernetes' runAsNonRoot can check it"
    assert final.all("ENTRYPOINT") == ['["rabbit-capture"]']
    assert final.all("CMD") == ['["run"]']
    (healthcheck,) = final.all("HEALTHCHECK")
    assert "/healthz" in healthcheck
    assert "curl" not in healthcheck
    labels = " ".join(final.all("LABEL"))
    for label in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels
    environment = {k: v for line in final.all("ENV") for k, v in env_pairs(line).items()}
    assert environment["PATH"].startswith("/opt/rabbit-archive/bin:")
    assert unknown_variables({k for k in environment if k.startswith(ENV_PREFIX)}) == set()
    assert environment[f"{ENV_PREFIX}HTTP_PORT"] in final.all("EXPOSE")


def tracked_files() -> list[str]:
    """The files a fresh clone has (tracked, plus new ones not ignored: what a commit would add)."""
    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return [
        name
        for name in result.stdout.decode().split("\0")
        if name and ((ROOT / name).is_file() or (ROOT / name).is_symlink())
    ]


@pytest.mark.acceptance
@pytest.mark.timeout(600)
def test_dockerfile_build_stage_run_as_written_installs_working_commands(tmp_path: Path) -> None:
    """Replay the build stage outside Docker: its COPY from the tracked files, its ENV and RUN lines.

    Absolute paths of the image (/opt/rabbit-archive, /src) become folders under tmp_path; `python`
    is this machine's Python 3.11, as the python:3.11 base image's is.
    """
    root = tmp_path / "image"

    def inside(path: str, workdir: Path) -> Path:
        return root / path.lstrip("/") if path.startswith("/") else workdir / path

    stages = dockerfile_stages()
    build, final = stages[0], stages[-1]
    files = tracked_files()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(Path(getattr(sys, "_base_executable", sys.executable)).resolve())
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith((ENV_PREFIX, "VIRTUAL_ENV", "PYTHON"))
    }
    environment["PATH"] = f"{bin_dir}:{environment['PATH']}"
    workdir = root
    ran = []
    for keyword, arguments in build.instructions:
        if keyword == "ENV":
            for key, value in env_pairs(arguments).items():
                environment[key] = str(inside(value, workdir)) if value.startswith("/") else value
        elif keyword == "WORKDIR":
            workdir = inside(arguments, workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, destination = shlex.split(arguments)
            assert not any(source.startswith("--") for source in sources), "COPY from the context only"
            target = inside(destination, workdir)
            for source in sources:
                chosen = [name for name in files if name == source or name.startswith(source + "/")]
                assert chosen, f"COPY {source}: not in the repository"
                for name in chosen:
                    if name != source:  # a directory: its contents go into the destination
                        into = target / Path(name).relative_to(source)
                    else:
                        into = target / Path(name).name if destination.endswith("/") else target
                    into.parent.mkdir(parents=True, exist_ok=True)
                    if (ROOT / name).is_symlink():  # as COPY does: the link itself
                        into.symlink_to(os.readlink(ROOT / name))
                    else:
                        shutil.copy2(ROOT / name, into)
        elif keyword == "RUN":
            result = subprocess.run(
                ["/bin/sh", "-c", arguments],
                cwd=workdir,
                env=environment,
                capture_output=True,
                text=True,
                timeout=540,
                check=False,
            )
            assert result.returncode == 0, f"RUN {arguments}\n{result.stdout}\n{result.stderr}"
            ran.append(arguments)
        else:
            assert keyword in ("ARG", "LABEL"), f"{keyword} is not replayed: extend this test"
    assert any("-c constraints.txt" in run for run in ran), "dependencies pinned by the lock file"

    # The final stage copies /opt/rabbit-archive from the build stage and puts its bin on PATH.
    venv = root / "opt/rabbit-archive"
    assert any(copy.endswith(" /opt/rabbit-archive /opt/rabbit-archive") for copy in final.all("COPY"))
    for program in ("rabbit-capture", "rabbit-replay"):
        result = subprocess.run(
            [str(venv / "bin" / program), "--help"],
            env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout
    commands = subprocess.run(
        [str(venv / "bin" / "rabbit-capture"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert " run " in commands
    # Installed with exactly the pinned versions.
    frozen = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True, check=True
    ).stdout
    pins = {line.lower() for line in (ROOT / "constraints.txt").read_text().split()}
    for line in frozen.split():
        if "==" in line:
            assert line.lower() in pins, f"{line} is not pinned by constraints.txt"


# ---- Compose ---------------------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def compose() -> dict[str, Any]:
    (document,) = load_yaml_documents(DEPLOY / "compose.yaml")
    return document


def test_compose_file_validates_against_the_compose_specification() -> None:
    result = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_sets_only_known_variables() -> None:
    names = set()
    for service in compose()["services"].values():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        names |= {name for name in environment if name.startswith(ENV_PREFIX)}
    assert f"{ENV_PREFIX}AMQP_URL" in names
    assert unknown_variables(names) == set()


def test_compose_starts_the_daemon_after_healthy_dependencies() -> None:
    document = compose()
    services = document["services"]
    assert "management" in services["rabbitmq"]["image"]
    for name in ("rabbitmq", "postgres", "capture"):
        assert services[name]["healthcheck"]["test"], name
    assert services["capture"]["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert services["producer"]["depends_on"]["capture"] == {"condition": "service_healthy"}
    assert services["capture"]["build"]["dockerfile"] == "deploy/Dockerfile"
    # Named volumes, declared at the top level.
    used = {
        volume.split(":")[0]
        for service in services.values()
        for volume in service.get("volumes", [])
        if not volume.startswith(".")
    }
    assert used == set(document["volumes"]) == {"rabbitmq-data", "postgres-data"}
    # The demo producer's script is in the repository.
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume.startswith("."):
                assert (DEPLOY / volume.split(":")[0]).is_file(), volume
    # The replay tool is at hand for `docker compose run --rm replay ...`.
    assert services["replay"]["entrypoint"] == ["rabbit-replay"]


# ---- Kubernetes ------------------------------------------------------------------------------


def kubernetes_documents() -> list[dict[str, Any]]:
    return [document for path in KUBERNETES_FILES for document in load_yaml_documents(path)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for document in kubernetes_documents() if document["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]
    return spec if workload["kind"] == "Pod" else spec["template"]["spec"]


def capture_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container that runs `rabbit-capture run`."""
    found = []
    for document in kubernetes_documents():
        if document["kind"] in ("Deployment", "StatefulSet"):
            for container in pod_spec(document)["containers"]:
                if container.get("args") == ["run"] and "rabbit-archive" in container["image"]:
                    found.append((document, container))
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate(version: str) -> None:
    assert {path.name for path in KUBERNETES_FILES} >= {"deployment.yaml", "sidecar.yaml"}
    result = subprocess.run(
        [
            str(BIN / "kubernetes-validate"),
            "--strict",
            "--kubernetes-version",
            version,
            *map(str, KUBERNETES_FILES),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for line in output.splitlines():
        if line.startswith("INFO") and " passed for resource " in line:
            continue
        custom = [f"kind {kind} with api version {api}" for api, kind in CUSTOM_KINDS]
        assert any(text in line for text in custom), f"unexpected: {line}"
    checked = sum(1 for document in kubernetes_documents() if document["kind"] != "ServiceMonitor")
    assert output.count(" passed for resource ") == checked


def test_kubernetes_manifests_set_only_known_variables() -> None:
    names = set()
    for document in kubernetes_documents():
        if document["kind"] in ("ConfigMap", "Secret"):
            names |= set(document.get("data", {})) | set(document.get("stringData", {}))
        if document["kind"] in ("Deployment", "StatefulSet", "Pod"):
            for container in pod_spec(document)["containers"]:
                names |= {item["name"] for item in container.get("env", [])}
    names = {name for name in names if name.startswith(ENV_PREFIX)}
    assert f"{ENV_PREFIX}DATABASE_URL" in names
    assert unknown_variables(names) == set()


def test_kubernetes_capture_containers_are_probed_limited_and_locked_down() -> None:
    containers = capture_containers()
    assert {workload["kind"] for workload, _ in containers} == {"Deployment", "StatefulSet"}
    configmaps = {document["metadata"]["name"]: document for document in of_kind("ConfigMap")}
    secrets = {document["metadata"]["name"]: document for document in of_kind("Secret")}
    for workload, container in containers:
        where = f"{workload['metadata']['name']}/{container['name']}"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where
        (port,) = container["ports"]
        assert port["name"] == "metrics", where
        assert container["livenessProbe"]["httpGet"]["port"] == "metrics", where
        resources = container["resources"]
        assert resources["requests"]["memory"] == "128Mi", where
        assert resources["limits"]["memory"] == "512Mi", where
        assert resources["requests"]["cpu"], where
        assert resources["limits"]["cpu"], where
        context = {**pod_spec(workload).get("securityContext", {}), **container["securityContext"]}
        assert context["runAsNonRoot"] is True, where
        assert context["runAsUser"] != 0, where
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where
        # URLs from a Secret, the rest from a ConfigMap.
        sources = container["envFrom"]
        (secret,) = [secrets[s["secretRef"]["name"]] for s in sources if "secretRef" in s]
        (config,) = [configmaps[s["configMapRef"]["name"]] for s in sources if "configMapRef" in s]
        assert set(secret["stringData"]) == {
            f"{ENV_PREFIX}AMQP_URL",
            f"{ENV_PREFIX}MANAGEMENT_URL",
            f"{ENV_PREFIX}DATABASE_URL",
        }, where
        assert not any(name.endswith("_URL") for name in config["data"]), where
        assert int(config["data"][f"{ENV_PREFIX}HTTP_PORT"]) == port["containerPort"], where
        # Several daemons may consume the one queue only one at a time.
        single_active = config["data"].get(f"{ENV_PREFIX}SINGLE_ACTIVE_CONSUMER", "true")
        assert single_active == "true", where


def test_kubernetes_deployment_runs_two_replicas() -> None:
    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "rabbit-capture"]
    assert deployment["spec"]["replicas"] == 2
    assert Settings.model_fields["single_active_consumer"].default is True


def test_service_monitor_selects_the_metrics_ports() -> None:
    (monitor,) = of_kind("ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["endpoints"]
    selected = [
        service
        for service in of_kind("Service")
        if selector.items() <= service["metadata"].get("labels", {}).items()
    ]
    assert len(selected) == 2, "the Deployment's and the sidecar's metrics Services"
    for service in selected:
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
