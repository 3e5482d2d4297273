"""The one error type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class VitexportError(Exception):
    """A problem the user can fix (bad path, bad image, unsupported model, missing runtime).

    The message must say what is wrong and what to do about it, in one line.
    Bugs are not VitexportErrors: they still raise with a traceback.
    """

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (what CI runners and `timeout` send), raised like Ctrl-C so every cleanup that handles an interrupt
    (staged output, temporary folders, the --out lock) runs for it too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def from_os_error(e: OSError) -> VitexportError:
    """A failed read or write as one line: a full disk, a read-only or forbidden folder is the user's to fix."""
    import errno

    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return VitexportError(f"no space left on the device{where}: free some space or choose an --out on another disk")
    if e.errno == errno.EROFS:
        return VitexportError(f"the file system is read-only{where}: choose another --out")
    if e.errno in (errno.EACCES, errno.EPERM):
        return VitexportError(f"permission denied{where}: choose a folder you can write to")
    return VitexportError(f"{e.strerror or e.__class__.__name__}{where}")
