#!/usr/bin/env bash
# Pins the test control plane to another Kubernetes release:
#   tests/controlplane/pin.sh v1.37.2
# Rewrites go.mod: requires k8s.io/kubernetes at that release, replaces every staging module
# (the ones k8s.io/kubernetes' own go.mod points at ./staging/...) by its published v0.X.Y, and
# requires the etcd server at the version of the etcd client that release uses; then `go mod tidy`.
# build.sh then builds into a new cache folder named by the new versions.
set -euo pipefail

version="${1:?usage: pin.sh v1.X.Y}"
[[ "$version" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || { echo "pin.sh: want v1.X.Y, got $version" >&2; exit 1; }
staging_version="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export GOFLAGS="-mod=mod"

# k8s.io/kubernetes' go.mod, from the module proxy (or the local module cache).
upstream="$(go mod download -json "k8s.io/kubernetes@$version" | awk -F'"' '$2 == "GoMod" { print $4 }')"
[[ -f "$upstream" ]] || { echo "pin.sh: cannot fetch k8s.io/kubernetes@$version go.mod" >&2; exit 1; }

etcd_version="$(awk '$1 == "go.etcd.io/etcd/client/v3" { print $2; exit }' "$upstream")"
mapfile -t staging < <(awk '/=> \.\/staging\// { print $1 }' "$upstream")

{
    echo "module gpushare.io/tests/controlplane"
    echo
    echo "go $(awk '$1 == "go" { print $2; exit }' "$upstream")"
    echo
    echo "// The Kubernetes release under test and the etcd server of the client it uses."
    echo "// Change both (and every replace below) with: tests/controlplane/pin.sh v1.X.Y"
    echo "require ("
    echo "	go.etcd.io/etcd/server/v3 $etcd_version"
    echo "	k8s.io/kubernetes $version"
    echo ")"
    echo
    echo "// Every staging module at its published version of the same release."
    echo "replace ("
    for module in "${staging[@]}"; do
        # A few staging modules (sample-cli-plugin...) are not published for every release.
        if go mod download "$module@$staging_version" >/dev/null 2>&1; then
            echo "	$module => $module $staging_version"
        else
            echo "pin.sh: $module $staging_version is not published; left out" >&2
        fi
    done
    echo ")"
} > go.mod.new
mv go.mod.new go.mod
rm -f go.sum
go mod tidy
echo "pinned k8s.io/kubernetes $version, etcd $etcd_version; now run build.sh" >&2
