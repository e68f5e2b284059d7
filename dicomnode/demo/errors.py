"""The demo's errors: one line naming the step that failed and what to do."""

from __future__ import annotations

from dicomnode.errors import ConfigError, DicomnodeError


class DemoFailed(DicomnodeError):
    """A step of the demo failed (exit status 1)."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"demo failed to {step}: {detail}")
        self.step = step


class DemoSetupError(ConfigError):
    """The demo cannot start as asked: no model weights, an unusable folder (exit status 2)."""
