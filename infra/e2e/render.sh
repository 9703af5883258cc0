#!/usr/bin/env bash
# Build the e2e's manifests: infra/ and infra/ray/ as kustomize builds them, through overlay/.
# Usage: render.sh OUT_DIR   (writes OUT_DIR/overlay/… and OUT_DIR/manifests.yaml)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: render.sh OUT_DIR}
kubectl=${KUBECTL:-$(command -v kubectl)}
rm -rf "$out/overlay"; mkdir -p "$out"
cp -r "$here/overlay" "$out/overlay"
"$kubectl" kustomize "$here/.." > "$out/overlay/infra.yaml"
"$kubectl" kustomize "$here/../ray" > "$out/overlay/ray.yaml"
"$kubectl" kustomize "$out/overlay" > "$out/manifests.yaml"
