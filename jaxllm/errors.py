"""Every error jaxllm raises for bad user input, in one place (the bottom of the package).

Each subclasses `JaxllmError` and the builtin a caller would expect (`ValueError` for input that
cannot be used, `RuntimeError` for an environment that cannot do what was asked), so both
`except jaxllm.errors.JaxllmError` and `except ValueError` work.
"""


class JaxllmError(Exception):
    """Base of the errors below."""


class ConfigError(JaxllmError, ValueError):
    """A model or run config that cannot be used; the message names the field."""


class CheckpointError(JaxllmError, ValueError):
    """A checkpoint (orbax run directory or Hugging Face folder) that cannot be read into this model."""


class DatasetError(JaxllmError, ValueError):
    """A dataset spec or path that cannot be used."""


class DataStateError(JaxllmError, ValueError):
    """A data position that does not belong to this pipeline (other layout, missing rows, old format)."""


class TokenIdError(JaxllmError, ValueError):
    """A token id outside the model's vocabulary."""


class TrajectoryError(JaxllmError, ValueError):
    """An agent trajectory that does not follow the ReAct protocol."""


class NonFiniteLossError(JaxllmError, RuntimeError):
    """Training produced a NaN/Inf loss, gradient or parameter; the step was not applied."""

    def __init__(self, step: int, what: str, last_good: int | None = None, directory: str = ""):
        self.step, self.what, self.last_good = step, what, last_good
        where = (
            f"last good checkpoint: step {last_good} in {directory}"
            if last_good is not None
            else "no checkpoint was saved before it"
        )
        super().__init__(
            f"non-finite {what} at step {step}; training stopped, nothing after step "
            f"{step - 1} was saved; {where}"
        )


# `jaxllm.agent.sandbox.SandboxUnavailableError` stays in that file: it is the sandbox child's
# entry point and imports the standard library only.
