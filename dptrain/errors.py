"""The one error type for user mistakes: the CLI prints it as one line and exits with 2."""


class UserError(Exception):
    """A mistake in config, data, checkpoint or launch that the user can fix."""


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1; resume to go on
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): checkpointed after the first one


def agreed(e: UserError) -> UserError:
    """Mark an error that every rank raises together (no abort needed, rank 0 reports it)."""
    e.agreed = True  # type: ignore[attr-defined]
    return e


class StopTraining(Exception):  # noqa: N818  (not always an error: preemption)
    """Raised inside the training loop to end training early with an exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
