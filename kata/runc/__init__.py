"""runc semantics on VMs: container records under --root, the lifecycle operations, and their monitors."""
