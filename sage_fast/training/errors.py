"""User errors: mistakes in what the user gave (config, paths, files, hardware), as opposed to bugs.

The ``sage-fast`` command (`sage_fast.cli`) prints a user error as one line, ``sage-fast: error: ...``, and
exits with status 2; a bug keeps its traceback (status 1). `user_error_message` decides which is which:

* `UserError`, raised where our code detects the user's mistake, and any exception whose class has the
  attribute ``user_error = True`` (so other modules can mark their own classes without importing this one:
  `sage_fast.training.config.ConfigError`, the model loader's errors, the checkpoint module's);
* the operating system's answers to a bad path or a full disk: `FileNotFoundError`, `PermissionError`,
  ``ENOSPC`` / ``EDQUOT`` / ``EROFS`` / ``ENOTDIR`` / ``EISDIR``, and torch's "inline_container.cc" write
  failure (what a full disk looks like to ``torch.save`` with a path);
* a file ``torch.load`` or safetensors cannot read (corrupt, truncated, not a checkpoint).

Other exceptions, ValueError and RuntimeError included, are not user errors: where a ValueError means a
mistake of the user's, the code that detects it raises `UserError` instead.
"""
from __future__ import annotations

import errno
import os
import re
import types
from typing import Iterator, Optional


class UserError(ValueError):
    """A mistake in the run's config, paths or files that the user has to fix; its message says how.

    A ValueError, so callers that caught the ValueErrors these checks raised before keep working.
    """

    user_error = True


def is_marked_user_error(exc: BaseException) -> bool:
    return getattr(type(exc), "user_error", False) is True


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_PATH_ERRNOS = (errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)


def user_error_message(exc: BaseException) -> Optional[str]:
    """The one-line message for a user error; None when `exc` is not one (a bug: keep the traceback)."""
    if is_marked_user_error(exc):
        return one_line(str(exc))
    loader = _failed_loader(exc)
    if loader is not None:
        return one_line(_unreadable_file_message(exc, *loader))
    if isinstance(exc, OSError):
        if exc.errno in _DISK_FULL:
            return one_line(f"no space left on device{_writing_in(exc)}: free some space, or set "
                            "train.output_dir to a folder on another disk")
        if isinstance(exc, (FileNotFoundError, PermissionError)) or exc.errno in _PATH_ERRNOS:
            return one_line(_os_error_text(exc))
        return None
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("inline_container.cc" in text or "PytorchStreamWriter" in text):
        # torch.save to a path writes through C++ (caffe2's zip writer): a full disk is an "enforce fail"
        # ("unexpected pos", "file write failed") with no errno; reading errors were recognised above
        return one_line(f"writing a file failed{_writing_in(exc)} ({text.strip()}): the disk is most likely "
                        "full; free some space, or set train.output_dir to a folder on another disk")
    return None


def one_line(text: str) -> str:
    """Messages of other libraries span lines (YAML's point at the column): join them for one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _writing_in(exc: BaseException) -> str:
    path = getattr(exc, "filename", None) or _file_in_traceback(exc, ("f", "tmp", "path", "filename"))
    return f" while writing in {os.path.dirname(os.path.abspath(path))}" if path else ""


def _os_error_text(exc: OSError) -> str:
    if exc.strerror and exc.filename is not None:
        # "[Errno 13] Permission denied: 'x'" -> "permission denied: x"
        text = f"{exc.strerror[:1].lower()}{exc.strerror[1:]}: {os.fspath(exc.filename)}"
        return text + (f" -> {os.fspath(exc.filename2)}" if exc.filename2 is not None else "")
    return str(exc)  # our own messages ("data.root does not exist: ...") stay as they are


# --------------------------------------------------------------------------------------------------
# Files that cannot be loaded


def _frames(exc: BaseException) -> Iterator[types.FrameType]:
    """The frames `exc` passed through, innermost first."""
    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return reversed(frames)


def _loader_codes():
    codes = {}
    try:
        import torch.serialization

        codes[torch.serialization.load.__code__] = ("torch", "f")
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        import safetensors.torch

        codes[safetensors.torch.load_file.__code__] = ("safetensors", "filename")
        codes[safetensors.torch.load.__code__] = ("safetensors", None)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return codes


def _failed_loader(exc: BaseException):
    """(library, file) when `exc` was raised inside torch.load / safetensors loading of a file, else None.

    torch.load reports a damaged file with whatever its parsers hit (RuntimeError from the zip reader, KeyError
    or EOFError from the legacy pickle path, UnpicklingError): the frame it was raised in is what says "this
    file could not be read", not the exception's type. A missing file stays a FileNotFoundError.
    """
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, MemoryError)):
        return None
    codes = _loader_codes()
    for frame in _frames(exc):
        hit = codes.get(frame.f_code)
        if hit is not None:
            lib, arg = hit
            return lib, _as_path(frame.f_locals.get(arg)) if arg else None
    if type(exc).__name__ == "SafetensorError":
        # safe_open is implemented in Rust and leaves no Python frame of its own: the file is the caller's
        return "safetensors", _file_in_traceback(exc, ("path", "filename", "weights"))
    return None


def load_failure_reason(exc: BaseException, lib: str = "torch") -> str:
    """Why torch.load (`lib` "torch") or safetensors could not read a file, on one line. Never torch's
    advice to load with weights_only=False: that runs whatever code the file holds, which sage-fast
    never does, so only the unpickler's reason is kept."""
    detail = str(exc).strip()
    if lib == "safetensors":
        return f"not a valid safetensors file, or truncated ({one_line(detail)})"
    if detail.startswith("Weights only load failed"):
        reason = detail.rsplit("WeightsUnpickler error:", 1)[-1]
        reason = re.split(r"Check the documentation|\. Please use", reason)[0]
        reason = one_line(reason).rstrip(".") or "not a pickle of tensors and plain data"
        if reason.startswith("Unsupported global"):
            return (f"it holds Python objects other than tensors and plain data ({reason}); sage-fast only "
                    "reads checkpoints it wrote, plain state dicts and safetensors files")
        detail = reason
    elif isinstance(exc, RuntimeError) and "PytorchStreamReader" in detail:
        detail = detail.split(". ")[0]
    elif not detail or isinstance(exc, KeyError):
        detail = f"{type(exc).__name__} {detail}".strip()
    return f"the file is corrupt, truncated or not a PyTorch checkpoint ({one_line(detail)[:300]})"


def _unreadable_file_message(exc: BaseException, lib: str, path: Optional[str]) -> str:
    return f"cannot read {path or 'a checkpoint file'}: {load_failure_reason(exc, lib)}"


def _as_path(value) -> Optional[str]:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    name = getattr(value, "name", None)  # an open file object
    return name if isinstance(name, str) else None


def _file_in_traceback(exc: BaseException, names) -> Optional[str]:
    """The innermost frame's file among its locals `names` (a path, or an open file's name): which file a
    library's error was about when its message does not say."""
    for frame in _frames(exc):
        for n in names:
            path = _as_path(frame.f_locals.get(n))
            if path:
                return path
    return None
