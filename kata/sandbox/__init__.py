"""The sandbox service: one VM per pod, its shared filesystem, network and agent connection; the
containers in it; the same calls for both front ends (kata/runc and kata/shim)."""
