#!/usr/bin/env bash
# Unit and integration tests of the service (real PostgreSQL and Redis, SQLite in temp dirs).
# test.sh: needs=cargo
set -euo pipefail
cd "$REPO_ROOT"
cargo test --profile ci --locked --all-targets
