"""Generated from k8s.io/kubelet v0.36.3: do not edit."""
