#!/usr/bin/env bash
# Start Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, trust auth, database `test`) if they are down.
set -euo pipefail

up() { (echo > "/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1; }

if ! up 6379; then
  echo "services: starting redis-server"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi

if ! up 5432; then
  echo "services: starting PostgreSQL"
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi

for _ in $(seq 1 60); do up 6379 && up 5432 && break; sleep 0.5; done
up 6379 || { echo "services: Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }
up 5432 || { echo "services: PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
if ! psql -h 127.0.0.1 -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
  psql -h 127.0.0.1 -U postgres -d postgres -c 'CREATE DATABASE test' >/dev/null
fi
echo "services: Redis and PostgreSQL are up"
