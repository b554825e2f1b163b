"""The errors a user can cause and fix (a bad file, flag, folder or device): every script catches UserError and
prints its message as one `error:` line. No PyTorch here: deploy.py runs without it."""
import sys


class UserError(Exception):
    """Something the user can fix; the message names the file, flag or index and what was expected."""


class DataError(UserError, ValueError):
    """A data file that is unreadable or does not hold what the layout says: the message names the file, the
    image and what was expected."""


class PhotoError(UserError, ValueError):
    """An image file that cannot be used (not an image, truncated, empty): the message says why; the caller names
    the file."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command names (or looks for) is not there."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that is missing, unreadable, not a SOLO checkpoint, or does not fit the model."""


class RunFolderError(UserError, RuntimeError):
    """A run folder that another process is writing to, or that holds another run's checkpoints."""


class DeviceError(UserError, RuntimeError):
    """The device asked for is not there (--device cuda without CUDA)."""


class WeightsUnavailableError(UserError, RuntimeError):
    """Pretrained backbone weights that are neither cached nor downloadable; the message says how to get them."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training met a NaN or infinite loss; the last good checkpoint is left as it was."""


class ExportError(UserError, RuntimeError):
    """An exported ONNX model that does not reproduce PyTorch's outputs."""


class ModelFileError(UserError, ValueError):
    """An ONNX file that cannot be read, or that export.py did not write."""


class WriteError(OSError, UserError):
    """A file could not be written (a full disk, a lost mount): the message names the file and the cause."""

    def __str__(self):
        return self.strerror


def error_message(error):
    """An error's message in one line. A DataLoader worker's error comes back with the worker's traceback in its
    message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); its last line is the
    original message."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)


def run_script(main, parser):
    """A script's __main__: main(parser.parse_args()), returning its result; a UserError (also one met in a
    DataLoader worker) ends the process with its one `error:` line and exit code 1."""
    try:
        return main(parser.parse_args())
    except UserError as e:
        sys.exit(f"error: {error_message(e)}")
