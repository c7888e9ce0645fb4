#!/bin/sh
# Forms the Redis Cluster of compose/docker-compose.cluster.yml once its nodes answer; does nothing when the
# first node already belongs to a cluster, so running it again (every `docker compose up`) is harmless.
#
# REDIS_CLUSTER_NODES: the nodes as host:port, space-separated, masters first (redis-cli --cluster create
# makes the first third masters and the rest their replicas). REDIS_CLUSTER_REPLICAS: replicas per master.
# It runs as the admin user; TOKENRELAY_REDIS_ADMIN_PASSWORD (default admin-dev) reaches redis-cli through
# REDISCLI_AUTH, never on a command line. REDIS_CLI and WAIT_S can be overridden (tests do).
set -eu
: "${REDIS_CLUSTER_NODES:?names the cluster nodes as host:port}"
cli="${REDIS_CLI:-redis-cli}"
export REDISCLI_AUTH="${TOKENRELAY_REDIS_ADMIN_PASSWORD:-admin-dev}"

addresses=""
for node in $REDIS_CLUSTER_NODES; do
    host=${node%:*}
    port=${node##*:}
    waited=0
    until [ "$("$cli" -h "$host" -p "$port" --user admin --no-auth-warning ping 2>/dev/null)" = PONG ]; do
        waited=$((waited + 1))
        if [ "$waited" -gt "${WAIT_S:-120}" ]; then
            echo "redis-cluster-init: $node did not answer as admin" >&2
            exit 1
        fi
        sleep 1
    done
    # CLUSTER MEET takes IP addresses only: resolve the service names
    ip=$(getent hosts "$host" | awk '{ print $1; exit }')
    addresses="$addresses ${ip:-$host}:$port"
done

first=${REDIS_CLUSTER_NODES%% *}
known=$("$cli" -h "${first%:*}" -p "${first##*:}" --user admin --no-auth-warning cluster info \
    | tr -d '\r' | sed -n 's/^cluster_known_nodes://p')
if [ "${known:-1}" -gt 1 ]; then
    echo "redis-cluster-init: $first already knows $known nodes: the cluster is formed"
else
    # shellcheck disable=SC2086  # one word per node
    "$cli" --user admin --no-auth-warning --cluster create $addresses \
        --cluster-replicas "${REDIS_CLUSTER_REPLICAS:-1}" --cluster-yes
fi
# the services that wait for this job start on a cluster that serves every slot
waited=0
until "$cli" -h "${first%:*}" -p "${first##*:}" --user admin --no-auth-warning cluster info \
        | grep -q '^cluster_state:ok'; do
    waited=$((waited + 1))
    if [ "$waited" -gt "${WAIT_S:-120}" ]; then
        echo "redis-cluster-init: the cluster is not ok" >&2
        exit 1
    fi
    sleep 1
done
