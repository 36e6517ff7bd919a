#!/usr/bin/env bash
# Download, on this (networked) machine, the wheels that the GPU machine lacks for bench/gpu_check.sh into .whl/
# (ignored by git; the device tool carries it). The GPU image holds torch, triton, timm, numpy, pandas, click, rich,
# matplotlib, requests and pyyaml (/work/.library/device/KINDS.md); these are the rest `harness launch`, `harness
# bench` and the peer import, at the versions requirements.lock pins, for CPython 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
NAMES="pydantic pydantic-core annotated-types typing-inspection mlflow mlflow-skinny mlflow-tracing sqlalchemy alembic
mako greenlet sqlparse cachetools databricks-sdk google-auth opentelemetry-api opentelemetry-sdk opentelemetry-proto
opentelemetry-semantic-conventions importlib-metadata fastapi starlette truststore spikingjelly loguru graphene
graphql-core graphql-relay gunicorn flask blinker itsdangerous docker cloudpickle pyasn1 pyasn1-modules rsa"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for name in $NAMES; do
  pin=$(grep -i -E "^$(echo "$name" | sed "s/[-_]/[-_]/g")==" requirements.lock || true)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .whl "${pin:-$name}" || echo "gpu_wheels: no wheel for ${pin:-$name}" >&2
done
du -sh .whl
