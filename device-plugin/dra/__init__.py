"""The DRA backend's node side: the ResourceSlice publisher and the kubelet DRA plugin."""
