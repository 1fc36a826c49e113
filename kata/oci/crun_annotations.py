"""Annotations crun reads beside the OCI spec: the host fills them (kata.oci.seccomp_bpf), and the
guest agent's warm-up uses them too, so this module goes into the guest image."""

SECCOMP_BPF_DATA = "run.oci.seccomp_bpf_data"  # the container's seccomp program, compiled (base64)
SECCOMP_FAIL_UNKNOWN_SYSCALL = "run.oci.seccomp_fail_unknown_syscall"


def seccomp_bpf_value(program: bytes) -> str:
    """SECCOMP_BPF_DATA's value for a compiled program (struct sock_filter entries)."""
    import base64  # not at the guest agent's start

    return base64.b64encode(program).decode()
