"""Errors raised for files that are not valid blob files.

Every message names the file and the field or tensor at fault, and says what was expected
and what was found, so that a user can tell a truncated download from a bug.
"""


class FormatError(ValueError):
    """Base class: the file is not a valid blob file (or not one this reader can interpret)."""


class NotABlobFile(FormatError):
    """The magic bytes are wrong: this is some other kind of file."""


class TruncatedFile(FormatError):
    """The file is shorter than its header says (an interrupted download or copy)."""


class CorruptHeader(FormatError):
    """A header field is out of range, or the header and footer disagree."""


class ChecksumMismatch(FormatError):
    """A CRC32C does not match: the bytes were damaged after writing."""

    def __init__(self, message: str, damaged: tuple[str, ...] = ()):
        super().__init__(message)
        self.damaged = damaged  # names of the damaged blobs (or "header" / "manifest")


class UnsupportedVersion(FormatError):
    """The file's major version is not one this reader understands."""


class UnsupportedFeature(FormatError):
    """The file requires a feature this reader does not implement."""


class CorruptManifest(FormatError):
    """The manifest is not valid UTF-8 JSON of the expected shape."""


class InvalidTensor(FormatError):
    """A tensor record is inconsistent: dtype, shape, size, offset, alignment or overlap."""


class InvalidTie(InvalidTensor):
    """A tie (alias) points at a missing tensor or forms a cycle."""


class MissingTensor(FormatError, KeyError):
    """A tensor that was asked for is not in the file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
