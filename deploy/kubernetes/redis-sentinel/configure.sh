#!/bin/sh
# Writes this pod's redis.conf and sentinel.conf into /conf. The master is the one the
# sentinels name, when any answers (after a failover it is no longer pod 0); otherwise, on the
# first start of the set, keygate-redis-0.
set -eu
self="$(hostname).keygate-redis"
master=""
if answer=$(timeout 5 redis-cli -h keygate-redis-sentinel -p 26379 --no-auth-warning \
        sentinel get-master-addr-by-name keygate 2>/dev/null); then
    master=$(printf '%s\n' "$answer" | head -n 1)
fi
case "$master" in
    ""|*ERR*|*NOAUTH*) master="keygate-redis-0.keygate-redis" ;;
esac

cat > /conf/redis.conf <<CONF
port 6379
dir /data
appendonly yes
requirepass ${REDISCLI_AUTH}
masterauth ${REDISCLI_AUTH}
replica-announce-ip ${self}
CONF
if [ "${master%%.*}" != "$(hostname)" ]; then
    echo "replicaof ${master} 6379" >> /conf/redis.conf
fi

cat > /conf/sentinel.conf <<CONF
port 26379
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip ${self}
requirepass ${REDISCLI_AUTH}
sentinel monitor keygate ${master} 6379 2
sentinel auth-pass keygate ${REDISCLI_AUTH}
sentinel down-after-milliseconds keygate 5000
sentinel failover-timeout keygate 60000
sentinel parallel-syncs keygate 1
CONF
