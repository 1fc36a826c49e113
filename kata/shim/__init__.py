"""containerd-shim-kata-v2: containerd's shim v2 for pods whose containers all run in one VM."""
