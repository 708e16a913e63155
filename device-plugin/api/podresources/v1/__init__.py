"""Generated from k8s.io/kubelet v0.36.3 pkg/apis/podresources/v1/api.proto: do not edit."""
