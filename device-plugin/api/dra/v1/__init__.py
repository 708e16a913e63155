"""Generated from k8s.io/kubelet v0.36.3 pkg/apis/dra/v1/api.proto: do not edit."""
