"""Getting dataset files onto the machine: the cache folder, downloads, and safe extraction.

A download streams into :func:`gblr._files.write_atomic`, so an interrupted one never leaves a
truncated file that a later run would take for the dataset, and shows a byte progress bar from
:func:`gblr._progress.progress_bar`.
"""

from __future__ import annotations

import http.client
import os
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..._files import write_atomic
from ..._progress import progress_bar

__all__ = ["cache_dir", "download_file", "join_url", "safe_extract"]

# Bytes read from the network per write (and per progress-bar update).
_READ_SIZE = 1 << 20


def cache_dir(dataset: str) -> Path:
    """``~/.cache/gblr/<dataset>``: where downloads go when no ``data_dir`` is given.

    Resolved at call time (not import time) so a changed ``HOME`` is honoured.
    """
    return Path.home() / ".cache" / "gblr" / dataset


def join_url(base: str, name: str) -> str:
    """``base`` and ``name`` joined by exactly one slash."""
    return base.rstrip("/") + "/" + name


def _network_error(url: str, exc: BaseException, offline_hint: str | None) -> RuntimeError:
    hint = offline_hint or "download it on a machine with network access and copy it here"
    return RuntimeError(f"could not download {url}: {exc}. Without network access: {hint}")


def download_file(url: str, path: str | os.PathLike, *, offline_hint: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``path`` atomically; return ``path``.

    The bytes stream into a temporary file beside ``path`` that replaces it only once complete
    (:func:`gblr._files.write_atomic`); on any failure the temporary file is removed and
    ``path`` is left as it was. A progress bar is shown when tqdm is installed. Network
    failures, including a connection closed before the announced length, raise a RuntimeError
    naming the URL and ``offline_hint`` (how to get the file without network access).
    """
    path = Path(path)

    def fetch(out: BinaryIO) -> None:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (OSError, http.client.HTTPException) as exc:  # URLError and HTTPError are OSErrors
            raise _network_error(url, exc, offline_hint) from exc
        with response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.strip().isdigit() else None
            received = 0
            with progress_bar(total, path.name, unit="B") as bar:
                while True:
                    try:
                        chunk = response.read(_READ_SIZE)
                    except (OSError, http.client.HTTPException) as exc:
                        raise _network_error(url, exc, offline_hint) from exc
                    if not chunk:
                        break
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise _network_error(url, OSError(f"connection closed after {received} of {total} bytes"), offline_hint)

    return write_atomic(path, fetch)


def safe_extract(archive: Path, destination: Path) -> None:
    """Extract a tar archive, refusing members that could land outside ``destination``.

    Absolute names, ``..`` components, links and device files are rejected up front (a
    dataset archive has only files and folders); ``filter="data"`` adds the standard
    library's own checks where this Python has it (3.12, and 3.8.17+/3.9.17+/3.10.12+/3.11.4+).
    """
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            name = member.name.replace("\\", "/")
            if name.startswith("/") or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
                raise ValueError(f"{archive}: refusing to extract {member.name!r}, an absolute path")
            if ".." in PurePosixPath(name).parts:
                raise ValueError(f"{archive}: refusing to extract {member.name!r}, it contains '..'")
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive}: refusing to extract {member.name!r}, not a regular file or folder")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(destination, members=members, filter="data")
        else:
            tar.extractall(destination, members=members)
