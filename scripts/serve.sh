#!/usr/bin/env bash
# Set up (if needed) and run the node with ./config.toml: Storage SCP on port 11112, archive and SQLite under ./var.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dicom-node serve --config config.toml "$@"
