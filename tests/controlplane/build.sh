#!/usr/bin/env bash
# Builds the real control plane that gpushare's `cluster` tests run against:
# etcd, kube-apiserver, kube-scheduler and kubectl, and for the `node` tests
# kube-controller-manager and kubelet, from the Kubernetes and etcd releases
# pinned in tests/controlplane/go.mod (the only place a version is written;
# change it with tests/controlplane/pin.sh v1.X.Y).
#
# The binaries land in a cache folder named by version:
#   ${GPUSHARE_CONTROLPLANE_CACHE:-$HOME/.cache/gpushare/controlplane}/<k8s>-etcd<etcd>/
# Only the binaries missing there are built; when all six are there this does nothing. The folder's path is
# always the last line printed on stdout (progress goes to stderr).
#
# Cold build: about 7 minutes on 2 cores with an empty Go build cache and the modules already
# downloaded (about 30 s more to fetch them from the Go module proxy), and kubelet and
# kube-controller-manager about 6 minutes more (on 2 busy cores, after the other four); a no-op
# when built.
# Needs only Go (>= the go line of go.mod; GOTOOLCHAIN=local); cgo is off, no C compiler needed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
gomod="$here/go.mod"

# Versions come from go.mod's first require block: one line to change there.
modversion() { awk -v m="$1" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$gomod"; }
k8s_version="$(modversion k8s.io/kubernetes)"
etcd_version="$(modversion go.etcd.io/etcd/server/v3)"
if [[ -z "$k8s_version" || -z "$etcd_version" ]]; then
    echo "build.sh: cannot read the k8s.io/kubernetes or etcd version from $gomod" >&2
    exit 1
fi

cache_root="${GPUSHARE_CONTROLPLANE_CACHE:-$HOME/.cache/gpushare/controlplane}"
dest="$cache_root/${k8s_version}-etcd${etcd_version#v}"
k8s_binaries=(kube-apiserver kube-scheduler kubectl kube-controller-manager kubelet)

missing=()
for b in etcd "${k8s_binaries[@]}"; do
    [[ -x "$dest/$b" ]] || missing+=("$b")
done
if ((${#missing[@]} == 0)); then
    echo "control plane $k8s_version / etcd $etcd_version already built" >&2
    echo "$dest"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: go is not on PATH (Go is needed to build the test control plane)" >&2
    exit 1
fi

# Stamp the real version into the binaries, as hack/lib/version.sh does, so
# that `kubectl version`, /version and the components' skew checks see it.
ver="${k8s_version#v}"
major="${ver%%.*}"
minor="${ver#*.}"
minor="${minor%%.*}"
build_date="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X ${pkg}.gitVersion=${k8s_version}"
    k8s_ldflags+=" -X ${pkg}.gitMajor=${major}"
    k8s_ldflags+=" -X ${pkg}.gitMinor=${minor}"
    k8s_ldflags+=" -X ${pkg}.gitCommit=0000000000000000000000000000000000000000"
    k8s_ldflags+=" -X ${pkg}.gitTreeState=clean"
    k8s_ldflags+=" -X ${pkg}.buildDate=${build_date}"
done

export CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

mkdir -p "$cache_root"
stage="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

start=$SECONDS
cd "$here"
packages=()
for b in "${missing[@]}"; do
    [[ "$b" == etcd ]] || packages+=("k8s.io/kubernetes/cmd/$b")
done
if ((${#packages[@]})); then
    echo "building ${packages[*]##*/} $k8s_version ..." >&2
    # One invocation: they share most packages and go schedules them together.
    go build -trimpath -ldflags "$k8s_ldflags" -o "$stage/" "${packages[@]}"
fi
if [[ " ${missing[*]} " == *" etcd "* ]]; then
    echo "building etcd $etcd_version ..." >&2
    go build -trimpath -ldflags "-s -w" -o "$stage/etcd" go.etcd.io/etcd/server/v3
fi

mkdir -p "$dest"
for b in "${missing[@]}"; do
    mv -f "$stage/$b" "$dest/$b"
done
echo "built in $((SECONDS - start)) s" >&2
echo "$dest"
