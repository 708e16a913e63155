#!/usr/bin/env bash
# One command for a local cluster on a real kubelet without a GPU (root, Debian bookworm):
#   sudo tests/node/up.sh
# Installs Debian's runc, CNI plugins, buildah and mmdebstrap if missing, builds the control plane
# with kubelet (tests/controlplane/build.sh, needs Go), containerd (tests/node/containerd/build.sh:
# Debian's has no CDI, which the DRA backend needs), the images (tests/node/images.sh) and KServe's
# controller manager (tests/kserve/build.sh), then runs tests/node/local.py until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."

packages=(runc containernetworking-plugins buildah mmdebstrap iproute2 iptables)
for command in runc buildah mmdebstrap ip iptables; do
    if ! command -v "$command" >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${packages[@]}" >/dev/null
        (service containerd stop || true) >/dev/null 2>&1
        break
    fi
done
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=strict
bash tests/controlplane/build.sh >/dev/null
bash tests/kserve/build.sh >/dev/null
bash tests/node/containerd/build.sh >/dev/null
bash tests/node/images.sh \
    "$(.venv/bin/python -c 'from tests import cluster; print(cluster.find_binaries())')/kube-scheduler" >/dev/null
exec .venv/bin/python -m tests.node.local
