"""The README's Production commands, run as written, deliver the SR to the PACS; health names a queue nobody consumes.

Issue 11: following the old recipe literally triaged every instance but delivered nothing, because no worker consumed
queue `cpu`. This test reads the ```sh block under "## Production" in README.md, replaces its `export` lines by this
machine's PostgreSQL, Redis, spool and an Orthanc PACS (same variable names), runs every other line as written, sends a
radiograph with dcmtk storescu and waits for the SR in Orthanc.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
from typer.testing import CliRunner

from tests.conftest import DICOM_DIR, ROOT, STORESCU_CFG, free_port, wait_for_port, wait_until

SOURCE = DICOM_DIR / "cr_chest_siim_jpeg_baseline_8bit.dcm"
EXPORTED = {
    "CXR_DATABASE_URL",
    "CXR_BROKER_URL",
    "CXR_BIND_ADDRESS",
    "CXR_ALLOWED_CALLING_AETS",
    "CXR_SPOOL_DIR",
    "CXR_RESULTS_DESTINATION_AET",
    "CXR_RESULTS_DESTINATION_HOST",
    "CXR_RESULTS_DESTINATION_PORT",
}


def production_block() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Production\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "no ```sh block under ## Production"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_production_commands_deliver_the_sr_to_the_pacs(pg_url, redis_url, tiny_registry, tmp_path):
    from tests.orthanc import Orthanc

    lines = production_block()
    exports = [line for line in lines if line.startswith("export ")]
    names = {word.split("=", 1)[0] for line in exports for word in shlex.split(line)[1:]}
    assert names == EXPORTED, f"the README exports {sorted(names)}; update this test's replacements"

    port, api_port = free_port(), free_port()
    orthanc = Orthanc(tmp_path / "orthanc", dicom_port=free_port(), http_port=free_port(), triage_aet="CXRTRIAGE",
                      triage_port=port)  # fmt: skip
    orthanc.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(
        {
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            # The README's exports, with this machine's parts:
            "CXR_DATABASE_URL": pg_url,
            "CXR_BROKER_URL": redis_url,
            "CXR_BIND_ADDRESS": "0.0.0.0",
            "CXR_ALLOWED_CALLING_AETS": "STORESCU,ECHOSCU",
            "CXR_SPOOL_DIR": str(tmp_path / "spool"),
            "CXR_RESULTS_DESTINATION_AET": "ORTHANC",
            "CXR_RESULTS_DESTINATION_HOST": "127.0.0.1",
            "CXR_RESULTS_DESTINATION_PORT": str(orthanc.dicom_port),
            # Not in the README (its defaults would collide with other tests on this machine):
            "CXR_HOME": str(tmp_path / "var"),
            "CXR_PORT": str(port),
            "CXR_API_PORT": str(api_port),
            "CXR_MODELS_DIR": str(tiny_registry.root),
        }
    )
    background: list[subprocess.Popen[bytes]] = []
    health = [line for line in lines if line.startswith("cxr-triage health")]
    try:
        for line in lines:
            if line.startswith("export ") or line in health:
                continue
            command = line.split("#", 1)[0].strip()
            if command.endswith("&"):
                log = (tmp_path / f"bg{len(background)}.log").open("wb")
                proc = subprocess.Popen(["bash", "-c", f"exec {command[:-1]}"], env=env, cwd=ROOT, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
                background.append(proc)
                if command.startswith("cxr-triage listener"):
                    wait_for_port(port, proc=proc)
            else:
                done = subprocess.run(["bash", "-c", command], env=env, cwd=ROOT, capture_output=True, timeout=120)
                assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])
        sent = subprocess.run(
            ["/usr/bin/storescu", "-aet", "STORESCU", "-aec", "CXRTRIAGE", "-xf", str(STORESCU_CFG), "CXR", "127.0.0.1",
             str(port), str(SOURCE)], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        study = str(pydicom.dcmread(SOURCE, stop_before_pixels=True).StudyInstanceUID)

        def sr_at_pacs() -> bool:
            return any(s["MainDicomTags"].get("Modality") == "SR" for s in orthanc.study_series(study))

        wait_until(sr_at_pacs, 180, "the SR to reach the PACS")
        for line in health:  # every part up, and each queue consumed
            checked = subprocess.run(["bash", "-c", line.split("#", 1)[0]], env=env, cwd=ROOT, capture_output=True,
                                     text=True, timeout=60)  # fmt: skip
            assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        for proc in background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in background:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        orthanc.stop()


def test_health_fails_when_a_queue_holds_work_that_no_worker_consumes(redis_url, tiny_registry, tmp_path, monkeypatch):
    from cxr_triage import settings as settings_module
    from cxr_triage.settings import Settings
    from infra.queue import send_result
    from service.cli import app

    monkeypatch.setenv("CXR_HOME", str(tmp_path / "var"))
    monkeypatch.setenv("CXR_BROKER_URL", redis_url)
    monkeypatch.setenv("CXR_MODELS_DIR", str(tiny_registry.root))
    settings_module.get_settings.cache_clear()
    runner = CliRunner()
    try:
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        assert runner.invoke(app, ["health", "--no-listener"]).exit_code == 0  # nothing waiting
        send_result(Settings(broker_url=redis_url, home=tmp_path / "var"), 12345)  # a delivery nobody will take
        down = runner.invoke(app, ["health", "--no-listener"])
        assert down.exit_code == 1
        queues = json.loads(down.output)["queues"]
        assert queues["ok"] is False and "no worker consumes cpu" in queues["detail"]
    finally:
        settings_module.get_settings.cache_clear()
