#!/usr/bin/env bash
# Builds KServe's controller manager (github.com/kserve/kserve/cmd/manager) at the release go.mod
# pins, for the `node` tests, and keeps beside it that release's CRDs, webhook configurations and
# inferenceservice ConfigMap (from the same module), cached by version:
#   ${GPUSHARE_KSERVE_CACHE:-$HOME/.cache/gpushare/kserve}/<version>/
# A no-op when built. The folder's path is the last line on stdout. Needs Go and the module proxy.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export GOFLAGS=-mod=readonly
version="$(awk '$1 == "require" && $2 == "github.com/kserve/kserve" { print $3 }' go.mod)"
[[ -n "$version" ]] || { echo "build.sh: go.mod names no github.com/kserve/kserve" >&2; exit 1; }
dest="${GPUSHARE_KSERVE_CACHE:-$HOME/.cache/gpushare/kserve}/$version"
if [[ -x "$dest/manager" && -s "$dest/VERSION" ]]; then
    echo "KServe $version already built" >&2
    echo "$dest"
    exit 0
fi
start=$SECONDS
# Fetch the module first: with an empty module cache `go list -m` names no folder.
go mod download github.com/kserve/kserve
source_dir="$(go list -m -f '{{.Dir}}' github.com/kserve/kserve)"
[[ -d "$source_dir" ]] || { echo "build.sh: no source folder for github.com/kserve/kserve" >&2; exit 1; }
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
echo "building KServe's manager $version ..." >&2
go build -trimpath -o "$stage/manager" github.com/kserve/kserve/cmd/manager
mkdir -p "$stage/crd" "$stage/webhook" "$stage/configmap"
cp "$source_dir"/config/crd/full/serving.kserve.io_*.yaml "$stage/crd/"
cp "$source_dir/config/webhook/manifests.yaml" "$stage/webhook/"
cp "$source_dir/config/configmap/inferenceservice.yaml" "$stage/configmap/"
chmod -R u+w "$stage"
echo "$version" >"$stage/VERSION"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$stage" "$dest"
trap - EXIT
echo "KServe $version built in $((SECONDS - start)) s" >&2
echo "$dest"
