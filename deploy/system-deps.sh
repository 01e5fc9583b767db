#!/usr/bin/env bash
# Make sure Java 17+ and Maven exist (the local Kafka broker runs from Maven Central jars).
# Installs them with apt-get when missing and we may; otherwise says in one line what to install.
set -euo pipefail

java_ok() {
  command -v java >/dev/null 2>&1 || return 1
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  [ -n "$v" ] && [ "$v" -ge 17 ]
}

missing=()
java_ok || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ -n "${PROPSTREAM_BOOTSTRAP:-}" ]; then
  exit 0  # an existing Kafka cluster: no local broker, no Java needed
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing ${missing[*]} with apt-get ..." >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  exit 0
fi
echo "propstream needs ${missing[*]} (Java 17+ and Maven run the local Kafka broker): install them, or set PROPSTREAM_BOOTSTRAP to an existing cluster" >&2
exit 1
