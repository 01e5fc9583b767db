#!/usr/bin/env bash
# Make sure Java 17+ and Maven exist (the local Kafka broker runs from Maven Central jars), and
# Debian's prometheus package (prometheus + promtool: the alert-rule tests and the real-Prometheus
# test). Installs them with apt-get when missing and we may; otherwise says in one line what to
# install. Without Java and no PROPSTREAM_BOOTSTRAP that is an error; without prometheus the
# Prometheus tests are skipped.
set -euo pipefail

java_ok() {
  command -v java >/dev/null 2>&1 || return 1
  local v
  v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
  [ -n "$v" ] && [ "$v" -ge 17 ]
}

missing=()
if [ -z "${PROPSTREAM_BOOTSTRAP:-}" ]; then  # an existing Kafka cluster: no local broker, no Java needed
  java_ok || missing+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null 2>&1 || missing+=(maven)
fi
prom=()
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || prom=(prometheus)
[ ${#missing[@]} -eq 0 ] && [ ${#prom[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing ${missing[*]} ${prom[*]} with apt-get ..." >&2
  apt-get update -qq >/dev/null
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ ${#prom[@]} -gt 0 ]; then
    # The package would start a Prometheus service on :9090 (and its recommends add node
    # exporters): we only want the binaries, so deny service starts while it installs.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${prom[@]}" >/dev/null
  fi
  exit 0
fi
if [ ${#prom[@]} -gt 0 ]; then
  echo "note: Debian's prometheus package (prometheus, promtool) is missing: the Prometheus and alert-rule tests will be skipped (apt-get install prometheus)" >&2
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "propstream needs ${missing[*]} (Java 17+ and Maven run the local Kafka broker): install them, or set PROPSTREAM_BOOTSTRAP to an existing cluster" >&2
  exit 1
fi
