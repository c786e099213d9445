"""Orthanc as the hospital PACS in tests: its own configuration, storage and ports, loopback only; with its DICOMweb
plugin (Debian's orthanc-dicomweb) when the test names DICOMweb servers to send to by STOW-RS."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

# Auto-forward, as a PACS routing rule would: every CR/DX image that arrives is sent to the triage AE.
AUTOROUTE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if modality == 'CR' or modality == 'DX' then
    SendToModality(instanceId, 'cxr')
  end
end
"""


class Orthanc:
    def __init__(
        self,
        home: Path,
        *,
        dicom_port: int,
        http_port: int,
        triage_aet: str,
        triage_port: int,
        autoroute: bool = True,
        dicomweb_servers: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`autoroute`: forward each CR/DX image to the triage AE by C-STORE (Lua). `dicomweb_servers`: the DICOMweb
        plugin's "Servers" (name -> {"Url": ..., "HttpHeaders": ...}), for `POST /dicom-web/servers/NAME/stow`."""
        self.home = home
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.proc: subprocess.Popen[bytes] | None = None
        home.mkdir(parents=True, exist_ok=True)
        (home / "autoroute.lua").write_text(AUTOROUTE_LUA)
        config = {
            "Name": "cxr-test-pacs",
            "StorageDirectory": str(home / "storage"),
            "IndexDirectory": str(home / "index"),
            "HttpServerEnabled": True,
            "HttpPort": http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": "ORTHANC",
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {"cxr": [triage_aet, "127.0.0.1", triage_port]},
            "LuaScripts": [str(home / "autoroute.lua")] if autoroute else [],
            "Plugins": [],
        }
        if dicomweb_servers is not None:
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": False,
                "Servers": dicomweb_servers,
            }
        (home / "orthanc.json").write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        log = (self.home / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            ["Orthanc", str(self.home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=self.home
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.home / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self._url(path), timeout=10) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: bytes) -> Any:
        request = urllib.request.Request(self._url(path), data=data, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def study_series(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The series of a study (each with MainDicomTags and Instances), or [] while unknown."""
        found = self.post("/tools/lookup", study_instance_uid.encode())
        studies = [f for f in found if f.get("Type") == "Study"]
        if not studies:
            return []
        return list(self.get(f"/studies/{studies[0]['ID']}/series"))
