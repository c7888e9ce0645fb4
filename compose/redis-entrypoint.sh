#!/bin/sh
# Starts redis-server on compose/redis.conf with each role's password taken from the environment.
#
# TOKENRELAY_REDIS_<ROLE>_PASSWORD (ROLE: PRODUCER, WORKER, MAINTENANCE, CELERY, ADMIN, REPLICA) replaces
# the hash of that role's development default; only the SHA-256 hash is written, to a copy of the file.
# REDIS_MASTERUSER=replica (Redis Cluster nodes, replicas) makes the server authenticate to its master as
# that user, with its password (or development default) passed as --masterauth, never written to disk;
# without it the replica user is switched off.
# REDIS_CONF (source), REDIS_CONF_OUT (rendered copy) and REDIS_SERVER can be overridden (tests do).
set -eu
src="${REDIS_CONF:-/usr/local/etc/redis/redis.conf}"
out="${REDIS_CONF_OUT:-/tmp/tokenrelay-redis.conf}"
umask 077
cp "$src" "$out"
for role in producer worker maintenance celery admin replica; do
    if [ "$role" = replica ] && [ -z "${REDIS_MASTERUSER:-}" ]; then
        continue  # switched off below
    fi
    upper=$(printf %s "$role" | tr '[:lower:]' '[:upper:]')
    eval "password=\${TOKENRELAY_REDIS_${upper}_PASSWORD:-}"
    if [ -n "$password" ]; then
        hash=$(printf %s "$password" | sha256sum | cut -d' ' -f1)
        sed -i "s/^user $role on #[0-9a-f]\{64\}/user $role on #$hash/" "$out"
    else
        echo "redis-entrypoint: TOKENRELAY_REDIS_${upper}_PASSWORD is not set: $role keeps its development password" >&2
    fi
done
if [ -z "${REDIS_MASTERUSER:-}" ]; then
    sed -i "s/^user replica on /user replica off /" "$out"  # a lone Redis has no replicas to let in
else
    case "$REDIS_MASTERUSER" in *[!a-z]*) echo "redis-entrypoint: REDIS_MASTERUSER must be a role name" >&2; exit 2;; esac
    upper=$(printf %s "$REDIS_MASTERUSER" | tr '[:lower:]' '[:upper:]')
    eval "password=\${TOKENRELAY_REDIS_${upper}_PASSWORD:-$REDIS_MASTERUSER-dev}"
    set -- --masteruser "$REDIS_MASTERUSER" --masterauth "$password" "$@"
fi
exec "${REDIS_SERVER:-redis-server}" "$out" "$@"
