#!/usr/bin/env bash
# Create ./.venv and install the node into it (torch from pip's local wheels: see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        # Debian's python3 ships venv separately.
        rm -rf .venv
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
        "$PYTHON" -m venv .venv
    fi
fi
# torch/torchvision first and pinned, so that the project's ranges install nothing bigger on top.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# The postgres extra (psycopg): the queue, export and worker tests run on PostgreSQL as well as SQLite.
.venv/bin/python -m pip install -q -e ".[test,postgres]"
