"""Lean roles: the listener, the worklist API and the `cxr-triage` command import no PyTorch, timm or fastai.

The core installs without them (pyproject: `worker` and `training` are extras), so the DICOM-facing host needs no
CUDA wheel. Each role runs in a fresh interpreter that refuses the heavy packages (a refused import is logged even
where the caller catches it: on a full install that import would have loaded the package), and once more in a
second virtual environment that holds only the core dependencies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from db.models import InstanceStatus
from tests.conftest import DICOM_DIR, ROOT, Service, free_port, instance_outcomes, wait_for_port, wait_until

# Import name -> distribution of what only the `worker` and `training` extras install.
HEAVY: dict[str, str] = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "safetensors": "safetensors",
    "highdicom": "highdicom",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "onnx": "onnx",
    "fastai": "fastai",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "pandas": "pandas",
}
REFUSED_LOG = "LEAN_ROLES_REFUSED_LOG"
# Run first in the child interpreter: note any heavy module loaded before it (say, by a .pth file), then refuse every
# heavy import from here on, noting each in the log.
REFUSE_HEAVY = f"""
import os, sys
_heavy = frozenset({sorted(HEAVY)!r})
_log = os.environ[{REFUSED_LOG!r}]
def _note(line):
    with open(_log, "a") as fh:
        fh.write(line + "\\n")
class _RefuseHeavy:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in _heavy:
            _note("refused " + fullname)
            raise ModuleNotFoundError(f"No module named {{fullname!r}} (refused by test_lean_roles)", name=fullname)
        return None
for _name in [m for m in sys.modules if m.partition(".")[0] in _heavy]:
    _note("loaded " + _name)
sys.meta_path.insert(0, _RefuseHeavy())
"""
# `cxr-triage ARGS...` as `python -c RUN_CLI ARGS...`.
RUN_CLI = """
import runpy, sys
sys.argv = ["cxr-triage", *sys.argv[1:]]
runpy.run_module("service", run_name="__main__")
"""
CHEST = DICOM_DIR / "dx_chest_nih_cxr14_implicit_le_label-no-finding.dcm"


def _refused(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _role_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "CXR_HOME": str(tmp_path / "var"),
            "CXR_MODELS_DIR": str(ROOT / "models"),
            "PYTHONPATH": str(ROOT),
            REFUSED_LOG: str(tmp_path / "refused.log"),
        }
    )
    return env


ENTRIES: dict[str, tuple[str, list[str]]] = {
    "listener": (
        "import listener.server\nfrom cxr_triage.settings import Settings\nlistener.server.build_ae(Settings())",
        [],
    ),
    "api": (
        "from worklist.app import create_app\nfrom cxr_triage.settings import Settings\ncreate_app(Settings())",
        [],
    ),
    "cli --help": (RUN_CLI, ["--help"]),
    "cli health --help": (RUN_CLI, ["health", "--help"]),
    "cli db upgrade": (RUN_CLI, ["db", "upgrade"]),
    "cli models list": (RUN_CLI, ["models", "list"]),
    "cli users list": (RUN_CLI, ["users", "list"]),
}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_role_entry_runs_without_importing_torch_timm_or_fastai(entry: str, tmp_path: Path) -> None:
    code, args = ENTRIES[entry]
    env = _role_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", REFUSE_HEAVY + code, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert _refused(tmp_path / "refused.log") == [], done.stderr[-3000:]


def test_the_refusal_catches_torch_where_the_worker_imports_it(tmp_path: Path) -> None:
    """The worker role is allowed PyTorch; under the refusal its task module fails, which shows the check bites."""
    env = _role_env(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", REFUSE_HEAVY + "import workers.tasks"], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "refused by test_lean_roles" in done.stderr
    assert any(line.startswith("refused torch") for line in _refused(tmp_path / "refused.log"))


def _project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        project: dict[str, object] = tomllib.load(fh)["project"]
    return project


def _distribution(requirement: str) -> str:
    """`celery[redis]==5.7.0` -> `celery`."""
    name = requirement
    for mark in ("[", "=", "<", ">", "~", "!", ";", " "):
        name = name.split(mark)[0]
    return name.lower()


def _core_requirements() -> list[str]:
    core = _project()["dependencies"]
    assert isinstance(core, list)
    return [str(requirement) for requirement in core]


def test_the_core_dependencies_name_no_heavy_package_and_the_extras_name_them_all() -> None:
    core = {_distribution(r) for r in _core_requirements()}
    extras = _project()["optional-dependencies"]
    assert isinstance(extras, dict)
    in_extras = {_distribution(r) for name in ("worker", "training") for r in extras[name]}
    heavy = set(HEAVY.values())
    assert core & heavy == set()
    assert not any(name.startswith("efficientnet") for name in core)
    assert heavy <= in_extras, f"not in the worker or training extra: {sorted(heavy - in_extras)}"
    assert all("==" in r for r in _core_requirements()), "core pins must be exact"


@pytest.fixture(scope="module")
def core_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second virtual environment with only the core dependencies of pyproject.toml (the project on PYTHONPATH)."""
    venv = tmp_path_factory.mktemp("core-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-warn-script-location",
         *_core_requirements()],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, f"pip could not install the core dependencies:\n{pip.stderr[-3000:]}"
    return python


def _cli_in_core_venv(python: Path, env: dict[str, str]) -> list[str]:
    """`cxr-triage` in the core-only environment, once it is shown to hold no torch."""
    code = f"import importlib.util as u; print([m for m in {sorted(HEAVY)!r} if u.find_spec(m)])"
    probe = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "[]", f"the core environment holds {probe.stdout}{probe.stderr}"
    return [str(python), "-c", RUN_CLI]


@pytest.mark.parametrize("interpreter", ["refusing heavy imports", "core-only venv"])
def test_listener_and_api_receive_queue_and_answer_without_torch(
    interpreter: str, service_factory: Callable[..., Service], request: pytest.FixtureRequest
) -> None:
    """Embedded defaults (SQLite, filesystem broker): a C-STORE is received and queued, the API answers."""
    service = service_factory(database_url="", broker_url="", models_dir=ROOT / "models", api_port=str(free_port()))
    refused_log = service.home / "refused.log"
    service.env[REFUSED_LOG] = str(refused_log)
    if interpreter == "core-only venv":
        command = _cli_in_core_venv(request.getfixturevalue("core_python"), service.env)
    else:
        command = [sys.executable, "-c", REFUSE_HEAVY + RUN_CLI]

    listener = service._spawn("listener", [*command, "listener"])
    wait_for_port(service.port, proc=listener, timeout=90)
    api = service._spawn("api", [*command, "api"])
    api_port = int(service.env["CXR_API_PORT"])
    wait_for_port(api_port, proc=api, timeout=90)

    sent = service.storescu(CHEST)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    sop = str(pydicom.dcmread(CHEST, stop_before_pixels=True).SOPInstanceUID)
    url = f"sqlite:///{(Path(service.env['CXR_HOME']) / 'cxr-triage.sqlite3').resolve()}"
    wait_until(lambda: sop in instance_outcomes(url), 30, "the instance row")
    assert instance_outcomes(url)[sop][0] == InstanceStatus.QUEUED
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}{path}", timeout=10) as response:
            assert response.status == 200, path
            assert json.loads(response.read())["down"] == []

    assert listener.poll() is None and api.poll() is None, service.log_text()[-3000:]
    assert _refused(refused_log) == [], service.log_text()[-3000:]
