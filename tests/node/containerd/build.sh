#!/usr/bin/env bash
# Builds containerd, its runc shim and ctr (github.com/containerd/containerd/v2) at the release
# go.mod pins, for the `node` tests, cached by version:
#   ${GPUSHARE_CONTAINERD_CACHE:-$HOME/.cache/gpushare/containerd}/<version>/
# Static binaries (no cgo, so no btrfs snapshotter: the tests use overlayfs). runc stays Debian's.
# A no-op when built. The folder's path is the last line on stdout. Needs Go and the module proxy.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export GOFLAGS=-mod=readonly
module=github.com/containerd/containerd/v2
version="$(awk -v m="$module" '$1 == "require" && $2 == m { print $3 }' go.mod)"
[[ -n "$version" ]] || { echo "build.sh: go.mod names no $module" >&2; exit 1; }
dest="${GPUSHARE_CONTAINERD_CACHE:-$HOME/.cache/gpushare/containerd}/$version"
binaries=(containerd containerd-shim-runc-v2 ctr)
built=1
for binary in "${binaries[@]}"; do [[ -x "$dest/$binary" ]] || built=0; done
if [[ "$built" = 1 ]]; then
    echo "containerd $version already built" >&2
    echo "$dest"
    exit 0
fi
start=$SECONDS
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
echo "building containerd $version ..." >&2
CGO_ENABLED=0 go build -trimpath -o "$stage/" "${binaries[@]/#/$module/cmd/}"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$stage" "$dest"
trap - EXIT
echo "containerd $version built in $((SECONDS - start)) s" >&2
echo "$dest"
