//go:build tools

// Package controlplane pins the Kubernetes and etcd releases whose main
// packages tests/controlplane/build.sh builds for gpushare's tests. It holds
// no code: the imports below only keep `go mod tidy` from dropping them.
package controlplane

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
