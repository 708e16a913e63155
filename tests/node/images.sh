#!/usr/bin/env bash
# Builds, without a Docker engine or a registry, the images the `node` tests import into containerd:
#   gpushare      the project's image from ./Dockerfile (its base given as PYTHON_IMAGE)
#   vllm-standin  gpushare's image plus tests/node/vllm_standin.py: a stand-in that runs vLLM's
#                 start-up checks (gpushare.simulator.vllm) against the fake NVML file
#   pause         the pod sandbox: a Python process that waits for SIGTERM
#   kube-scheduler  the kube-scheduler binary built by tests/controlplane/build.sh (its path is the
#                 first argument), alone in an image, for manifests/scheduler's Deployment
# The base is Debian bookworm's python3 (3.11, as python:3.11-slim-bookworm) made by mmdebstrap,
# trusting the host's CA bundle (so pip in the Dockerfile's RUN reaches PyPI the way the host does).
# buildah builds with chroot isolation into throwaway storage; each image is saved as an OCI archive.
#
# Cached by content: the folder is
#   ${GPUSHARE_IMAGES_CACHE:-$HOME/.cache/gpushare/images}/<sha256 of what goes into the images>/
# holding <name>.tar and images.txt ("<name> <reference>" per line); when it is complete this does
# nothing. The Debian root filesystem is cached apart, by its recipe. The folder's path is the last
# line on stdout (progress goes to stderr). Needs root, buildah and mmdebstrap (Debian packages).
set -euo pipefail

kube_scheduler="${1:?usage: images.sh PATH/TO/kube-scheduler (built by tests/controlplane/build.sh)}"
[[ -x "$kube_scheduler" ]] || { echo "images.sh: $kube_scheduler is not an executable" >&2; exit 1; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache_root="${GPUSHARE_IMAGES_CACHE:-$HOME/.cache/gpushare/images}"
suite=bookworm
packages=python3,python3-venv,python-is-python3,ca-certificates

for tool in buildah mmdebstrap; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "images.sh: $tool is not on PATH (apt-get install buildah mmdebstrap)" >&2
        exit 1
    fi
done

# What goes into the images: the Dockerfile, the package's sources, this script, the stand-in and
# the kube-scheduler binary.
key="$(
    {
        cd "$repo"
        find Dockerfile pyproject.toml README.md core runtime scheduler webhook device-plugin simulator \
            tests/node/images.sh tests/node/vllm_standin.py -type f ! -path '*/__pycache__/*' \
            ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
        sha256sum <"$kube_scheduler"
    } | sha256sum | cut -c1-16
)"
dest="$cache_root/$key"
if [[ -s "$dest/images.txt" ]]; then
    echo "images $key already built" >&2
    echo "$dest"
    exit 0
fi

mkdir -p "$cache_root"
stage="$(mktemp -d "$cache_root/.build.XXXXXX")"
B=(buildah --root "$stage/storage" --runroot "$stage/run" --storage-driver vfs)
cleanup() {
    "${B[@]}" rm --all >/dev/null 2>&1 || true
    rm -rf "$stage"
}
trap cleanup EXIT
start=$SECONDS

rootfs="$cache_root/rootfs-$suite-$(echo "$packages" | sha256sum | cut -c1-12).tar"
if [[ ! -s "$rootfs" ]]; then
    echo "mmdebstrap $suite ($packages) ..." >&2
    mmdebstrap --quiet --variant=minbase --include="$packages" "$suite" "$stage/rootfs.tar" >&2
    mv "$stage/rootfs.tar" "$rootfs"
fi

tag="$key"
base="localhost/gpushare-test/python:$suite"
ref_gpushare="localhost/gpushare:$tag"
# Named as a variant of vllm/vllm-openai, whose entrypoint it stands in for: the webhook sizes a
# container that sets no command only when its image is known to start vLLM.
ref_standin="localhost/gpushare-test/vllm/vllm-openai-standin:$tag"
ref_pause="localhost/gpushare-test/pause:$tag"
scheduler_version="$("$kube_scheduler" --version | awk '{ print $2 }')"
ref_scheduler="localhost/gpushare-test/kube-scheduler:$scheduler_version-$tag"

echo "base image from $rootfs ..." >&2
c="$("${B[@]}" from scratch)"
"${B[@]}" add "$c" "$rootfs" / >&2
"${B[@]}" copy "$c" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >&2
"${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 "$c" >&2
"${B[@]}" commit --quiet --rm "$c" "$base" >&2

echo "gpushare from the Dockerfile ..." >&2
"${B[@]}" bud --quiet --isolation chroot --layers=false --build-arg "PYTHON_IMAGE=$base" \
    -t "$ref_gpushare" -f "$repo/Dockerfile" "$repo" >&2

echo "vllm-standin ..." >&2
c="$("${B[@]}" from "$ref_gpushare")"
"${B[@]}" copy "$c" "$here/vllm_standin.py" /opt/standin/vllm_standin.py >&2
# `python3 -m vllm.entrypoints.api_server` and `...openai.api_server` (the seed's custom container
# and KServe's vLLM runtime) run the stand-in as well.
shim="$stage/shim"
mkdir -p "$shim/vllm/entrypoints/openai"
touch "$shim/vllm/__init__.py" "$shim/vllm/entrypoints/__init__.py" \
    "$shim/vllm/entrypoints/openai/__init__.py"
for module in "$shim/vllm/entrypoints/api_server.py" "$shim/vllm/entrypoints/openai/api_server.py"; do
    printf 'import runpy\nrunpy.run_path("/opt/standin/vllm_standin.py", run_name="__main__")\n' \
        >"$module"
done
"${B[@]}" copy "$c" "$shim" /opt/standin/shim >&2
# As vllm/vllm-openai's entrypoint, the stand-in takes vLLM's arguments (KServe's `args`).
"${B[@]}" config --user 65532:65532 --env PYTHONPATH=/opt/standin/shim \
    --entrypoint '["python3", "/opt/standin/vllm_standin.py"]' --cmd '' "$c" >&2
"${B[@]}" commit --quiet --rm "$c" "$ref_standin" >&2

echo "pause ..." >&2
c="$("${B[@]}" from "$base")"
"${B[@]}" config --user 65535:65535 --entrypoint '["python3", "-c",
"import signal, sys\nfor s in (signal.SIGTERM, signal.SIGINT): signal.signal(s, lambda *_: sys.exit(0))\nwhile True: signal.pause()"]' \
    --cmd '' "$c" >&2
"${B[@]}" commit --quiet --rm "$c" "$ref_pause" >&2

echo "kube-scheduler $scheduler_version ..." >&2
c="$("${B[@]}" from scratch)"
"${B[@]}" copy "$c" "$kube_scheduler" /usr/local/bin/kube-scheduler >&2
"${B[@]}" config --env PATH=/usr/local/bin --user 65532:65532 \
    --entrypoint '["/usr/local/bin/kube-scheduler"]' "$c" >&2
"${B[@]}" commit --quiet --rm "$c" "$ref_scheduler" >&2

mkdir -p "$stage/out"
for pair in "gpushare $ref_gpushare" "vllm-standin $ref_standin" "pause $ref_pause" \
    "kube-scheduler $ref_scheduler"; do
    read -r name ref <<<"$pair"
    "${B[@]}" push --quiet "$ref" "oci-archive:$stage/out/$name.tar:$ref" >&2
    echo "$name $ref" >>"$stage/out/images.txt"
done
rm -rf "$dest"
mv "$stage/out" "$dest"
echo "images built in $((SECONDS - start)) s" >&2
echo "$dest"
