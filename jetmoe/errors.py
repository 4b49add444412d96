"""The one exception type for mistakes a user can fix (config, data, checkpoint, launch environment).

Entry points catch it once and print its message as a single line; everything else is a bug and keeps
its traceback.
"""


class JetMoEError(Exception):
    """A user-facing error: the message names the problem and the fix, in one line."""


class ResumeMismatch(JetMoEError):
    """The config asks for something the checkpoint cannot continue (another model, data order or mixture
    past). A config error, never damage: the resume stops with it instead of falling back to an older
    checkpoint, and nothing is written."""
