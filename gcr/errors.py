"""Domain errors. Library code raises these; only the CLI turns them into exit codes.

Every message is one sentence that names the problem and the fix.
"""

EXIT_OK = 0
EXIT_RUNTIME = 1      # something failed while running (model load, generation, OOM ...)
EXIT_USAGE = 2        # bad input: fix the command line or the file
EXIT_UNSCORED = 3     # the run (for a batch: every job) completed but no round could be scored


class GcrError(Exception):
    """An expected failure with a message meant for the user."""

    exit_code = EXIT_RUNTIME


class UsageError(GcrError):
    """The user asked for something that cannot work as asked."""

    exit_code = EXIT_USAGE


class ModelLoadError(GcrError):
    """A generator or critic could not be loaded."""


class OutOfMemory(GcrError):
    """CUDA ran out of memory; the message names the flag to try."""


class CriticUnavailable(GcrError):
    """The critic cannot answer at all (its server is down, refuses us, or keeps failing): every job
    waiting on it fails the same way, so the loop does not retry job by job."""


class StorageError(GcrError):
    """The run store could not be read or written (disk full, I/O error, file-size limit, read-only
    directory ...). A read-only or unusable runs directory is the user's to fix (exit 2); a fault
    that strikes mid-run is a runtime failure (exit 1). Completed rounds are always kept."""

    def __init__(self, action: str, cause: str, fix: str, usage: bool = False, hint: str | None = None):
        self.action, self.cause, self.fix, self.usage, self.hint = action, cause, fix, usage, hint
        self.exit_code = EXIT_USAGE if usage else EXIT_RUNTIME
        then = f", then {hint}" if hint else ""
        super().__init__(f"Could not {action}: {cause}; {fix}{then}.")

    def then(self, hint: str) -> "StorageError":
        """The same fault, with what to run once it is fixed (how to continue the run or batch)."""
        return StorageError(self.action, self.cause, self.fix, self.usage, hint)
