"""The gateway subsystem's one exception type."""


class GatewayError(Exception):
    """The proxy could not be configured, started or reached; the message says why."""
