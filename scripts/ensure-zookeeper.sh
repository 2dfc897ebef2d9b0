#!/bin/sh
# Install Debian's ZooKeeper (server jar + Java) if it is missing. Idempotent; quiet on
# success. The tests run their own private ZooKeeper JVMs (celery_mutex_bootstep/testing/);
# this script never starts or configures a server.
set -eu

JAR=/usr/share/java/zookeeper.jar

if [ -f "$JAR" ] && command -v java >/dev/null 2>&1; then
    exit 0
fi

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "ensure-zookeeper: $JAR is missing and this is not root: apt-get install zookeeper" >&2
        exit 1
    fi
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $SUDO apt-get update \
       && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y zookeeper; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "ensure-zookeeper: installing the zookeeper package failed" >&2
    exit 1
fi

if [ ! -f "$JAR" ]; then
    echo "ensure-zookeeper: $JAR still missing after installing zookeeper" >&2
    exit 1
fi
