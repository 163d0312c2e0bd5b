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
