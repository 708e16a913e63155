"""Generated from k8s.io/kubelet v0.36.3 pkg/apis/pluginregistration/v1/api.proto: do not edit."""
