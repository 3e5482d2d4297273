"""The one error type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class VitexportError(Exception):
    """A problem the user can fix (bad path, bad image, unsupported model, missing runtime).

    The message must say what is wrong and what to do about it, in one line.
    Bugs are not VitexportErrors: they still raise with a traceback.
    """

    exit_code = 2
