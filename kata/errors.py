"""Which exceptions carry a message meant for the user (printed as is, no 'internal error')."""

from __future__ import annotations


class KataError(Exception):
    """Base for the core's own one-line errors."""


def user_errors() -> tuple[type[BaseException], ...]:
    # Imported lazily: each layer defines its own error type, and the CLI must not pay for
    # importing every layer just to print a message.
    from kata.config import ConfigError
    from kata.core.paths import InvalidIdError
    from kata.fs_share.shared_dir import ShareError
    from kata.hypervisor.base import HypervisorError
    from kata.oci.spec import OCIError

    types: list[type[BaseException]] = [
        KataError, ConfigError, InvalidIdError, ShareError, HypervisorError, OCIError, TimeoutError,
    ]
    try:
        from kata.agent.client import AgentError

        types.append(AgentError)
    except ImportError:
        pass
    return tuple(types)
