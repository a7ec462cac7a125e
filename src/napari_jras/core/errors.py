"""Exception types with messages meant for the person using the tool."""


class JRASError(Exception):
    """Base class of every error napari-jras raises on purpose (shown without a traceback)."""


class DataError(JRASError, ValueError):
    """An input image, label or folder cannot be used; the message says why and what to do."""


class ModelError(JRASError):
    """A checkpoint or model configuration cannot be loaded or is inconsistent."""


class BankError(JRASError):
    """An exemplar bank is missing, damaged, empty or incompatible."""


class CancelledError(JRASError):
    """A long operation (e.g. fine-tuning) was cancelled; nothing it would have made is kept."""


class StorageError(JRASError, OSError):
    """A file could not be written or read (disk full, no permission, folder gone).

    Also an :class:`OSError` (with ``errno`` when known); whatever the file held before is intact.
    """

    @classmethod
    def of(cls, exc: OSError, action: str, path: object) -> "StorageError":
        """``Cannot <action> <path>: <reason>`` for an :class:`OSError` ``exc`` (errno kept).

        Args:
            exc: the error the operating system raised.
            action: what was attempted, as a verb phrase (e.g. ``"write"``).
            path: the file or folder concerned, shown with ``str``.

        Returns:
            A new :class:`StorageError` (to ``raise ... from exc``) whose ``errno`` is
            ``exc.errno``; the reason is ``exc.strerror``, else ``str(exc)``.
        """
        error = cls(f"Cannot {action} {path}: {exc.strerror or exc}")
        error.errno = exc.errno
        return error


class DataWarning(UserWarning):
    """Input accepted after a change the user should know about (e.g. 0/255 masks as 0/1)."""
