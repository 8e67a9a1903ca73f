#!/usr/bin/env bash
# Regenerate gen/ from proto/ with no network: copy the googleapis protos we import from the
# installed googleapis-common-protos package, run buf generate, then build Envoy's descriptor set.
# With --deps-only, only copy the googleapis protos (what `buf lint` needs on a fresh clone).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
deps=build/proto-deps
rm -rf "$deps" && mkdir -p "$deps/google/api" "$deps/google/rpc"
site=$("$py" -c 'import google.api, pathlib; print(pathlib.Path(google.api.__path__[0]).parent)')
cp "$site/api/annotations.proto" "$site/api/http.proto" "$site/api/httpbody.proto" "$deps/google/api/"
cp "$site/rpc/status.proto" "$site/rpc/error_details.proto" "$deps/google/rpc/"
[ "${1:-}" = "--deps-only" ] && exit 0
export PATH="$(dirname "$py"):$PATH"
buf generate
# Without source info (comments): Envoy does not need them, and the descriptor has to fit a ConfigMap.
buf build --exclude-source-info -o gen/mt5mesh.binpb
