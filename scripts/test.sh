#!/usr/bin/env bash
# Set up (Debian test peers and PostgreSQL + .venv) and run the whole test suite. Used unchanged by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=""
for tool in storescu dciodvfy Orthanc chromium chromedriver openssl; do command -v "$tool" >/dev/null 2>&1 || missing=1; done
# PostgreSQL's server binaries (tests/support/postgres.py starts a throwaway cluster): Debian keeps them off PATH.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing=1
if [ -n "$missing" ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dcmtk dicom3tools orthanc postgresql \
        chromium chromium-driver openssl >/dev/null
fi
bash scripts/setup.sh
# Linters first (configured in pyproject.toml): a finding fails the run like a failing test.
.venv/bin/ruff check .
.venv/bin/mypy
# pytest exits 5 when it collected no test: that must fail, not pass.
exec .venv/bin/python -m pytest -q "$@"
