#!/usr/bin/env bash
# Install (if needed) and start a PostgreSQL server on loopback for the distributed-calibration
# tests; prints the SQLAlchemy URL of an empty test database on stdout. Idempotent.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
fi
cluster=$(pg_lsclusters -h 2>/dev/null | awk 'NR==1 {print $1" "$2}')
if [ -z "$cluster" ]; then
  version=$(ls /usr/lib/postgresql | sort -n | tail -1)
  $SUDO pg_createcluster "$version" main >&2
  cluster="$version main"
fi
# shellcheck disable=SC2086
$SUDO pg_ctlcluster $cluster start >&2 2>/dev/null || true
port=$(pg_lsclusters -h | awk 'NR==1 {print $3}')
as_pg() { $SUDO su postgres -c "$1"; }
as_pg "psql -p $port -tAc \"SELECT 1 FROM pg_roles WHERE rolname='sparge'\"" | grep -q 1 \
  || as_pg "psql -p $port -qc \"CREATE ROLE sparge LOGIN PASSWORD 'sparge'\"" >&2
as_pg "psql -p $port -tAc \"SELECT 1 FROM pg_database WHERE datname='sparge_test'\"" | grep -q 1 \
  || as_pg "createdb -p $port -O sparge sparge_test" >&2
echo "postgresql+psycopg2://sparge:sparge@127.0.0.1:$port/sparge_test"
