"""Grid tests reuse the container tests' hub and signed busybox image."""

from tests.node.runtime.conftest import env

__all__ = ["env"]
