"""Writing files whole or not at all: a crash, a kill or a full disk leaves the old file or the new one, never
half of one, and an operating-system failure becomes a WriteError naming the file."""
import os
import re
import uuid

from errors import WriteError


def fsync_dir(directory):
    try:  # makes the rename durable; not possible on every platform / file system
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error(error):
    """The OSError in an error's chain (torch.save reports a full disk as a RuntimeError of its zip writer), or
    None."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def os_errno(error):
    """The operating system's error number behind error: an OSError's in its chain, else the 'errno = N' that HDF5
    writes into h5py's messages (some of which are RuntimeErrors); None if neither is there."""
    cause = _os_error(error)
    if cause is not None and cause.errno:
        return cause.errno
    found = re.search(r"\berrno = (\d+)", str(error))
    return int(found.group(1)) if found else None


def write_error(path, error):
    """WriteError naming the file and the operating system's reason (e.g. 'No space left on device': the text of
    the error number, as h5py's errors carry HDF5's whole report of several lines in their message)."""
    cause, code = _os_error(error), os_errno(error)
    if code:
        reason = os.strerror(code)
    elif cause is not None and cause.strerror:
        reason = cause.strerror
    else:
        reason = str(error)
    return WriteError(code, f"cannot write {path}: {reason}")


def temporary_path(path):
    """Where a write of path goes first: '.NAME.<id>.tmp' in path's folder (hidden, and unique per write)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")


def is_temporary(name, of=None):
    """Whether a file name is a temporary_path's (of: of one of these file names only)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return of is None or any(name.startswith(f".{target}.") for target in of)


def remove_temporaries(directory, of=None):
    """Remove the temporary files (is_temporary) that interrupted writes left in directory; returns their names.
    Call it where no write of this process is under way there."""
    removed = []
    for name in os.listdir(directory):
        if is_temporary(name, of):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(name)
            except FileNotFoundError:  # another process removed it first
                pass
    return removed


def atomic_write(path, write):
    """Call write(file) on a temporary file in path's folder, fsync it, then rename it onto path: a crash leaves
    either the old file or the new one, never half of one. The temporary file (temporary_path) is
    temporary file is removed on any failure, and a failure of the operating system's (a full disk, a lost mount)
    is reported as a WriteError naming path and the cause."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temporary_path(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the usual permissions, after the umask
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, Exception) and not isinstance(e, WriteError) and _os_error(e) is not None:
            raise write_error(path, e) from e
        raise
    fsync_dir(directory)
