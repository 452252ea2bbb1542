#!/usr/bin/env bash
# Makes sure a PostgreSQL server is running on 127.0.0.1:5432 with wal_level=logical.
# Installs it from Debian's packages when missing. Idempotent.
set -euo pipefail
log() { echo "[setup-postgres] $*" >&2; }
PGHOST_ADDR=${PGHOST_ADDR:-127.0.0.1}
PGPORT=${PGPORT:-5432}
psql_admin() { psql -X -q -h "$PGHOST_ADDR" -p "$PGPORT" -U postgres -d postgres -tAc "$1"; }

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  log "PostgreSQL not installed: installing from Debian packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql postgresql-client >/dev/null
fi
command -v psql >/dev/null || { apt-get update -qq; apt-get install -y -qq postgresql-client >/dev/null; }

version=$(ls /etc/postgresql | sort -V | tail -n 1)
start_cluster() { pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true; }

ready() { pg_isready -q -h "$PGHOST_ADDR" -p "$PGPORT"; }
if ! ready; then
  log "starting cluster $version/main"
  start_cluster
  for _ in $(seq 1 50); do ready && break; sleep 0.2; done
fi
ready || { log "PostgreSQL did not start"; exit 1; }

# Local tests and the demo use trust auth for postgres on loopback (the Debian default
# here); a cluster we installed ourselves needs it set.
if ! psql_admin "select 1" >/dev/null 2>&1; then
  hba=/etc/postgresql/$version/main/pg_hba.conf
  log "enabling trust auth for loopback in $hba"
  sed -i '1i host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\nlocal all postgres trust' "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  sleep 1
fi

# The test suite runs several pipelines at once, each with its own slot and walsender;
# Postgres' defaults (10 of each) are too tight for that plus a running demo.
MIN_SLOTS=${MIN_SLOTS:-32}
restart=no
level=$(psql_admin "show wal_level")
if [ "$level" != "logical" ]; then
  log "wal_level is $level: setting logical"
  psql_admin "ALTER SYSTEM SET wal_level = logical"
  restart=yes
fi
for setting in max_replication_slots max_wal_senders; do
  value=$(psql_admin "show $setting")
  if [ "$value" -lt "$MIN_SLOTS" ]; then
    log "$setting is $value: setting $MIN_SLOTS"
    psql_admin "ALTER SYSTEM SET $setting = $MIN_SLOTS"
    restart=yes
  fi
done
if [ "$restart" = yes ]; then
  log "restarting cluster $version/main for the settings above"
  pg_ctlcluster --skip-systemctl-redirect "$version" main restart
  for _ in $(seq 1 50); do ready && break; sleep 0.2; done
fi
level=$(psql_admin "show wal_level")
[ "$level" = "logical" ] || { log "wal_level is still $level"; exit 1; }
log "PostgreSQL $version ready on $PGHOST_ADDR:$PGPORT with wal_level=logical"
