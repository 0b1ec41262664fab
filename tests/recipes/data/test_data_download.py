"""Downloads and archive extraction (gblr.recipes.data.download), against file:// URLs and fakes."""

import io
import os
import sys
import tarfile
import urllib.request

import pytest

from gblr.recipes.data import download_file
from gblr.recipes.data.download import safe_extract


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_download_file_is_atomic_and_exact(tmp_path, monkeypatch, with_tqdm):
    if not with_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # no progress bar, silently
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    payload = bytes(range(256)) * 5000  # over one read chunk
    source = tmp_path / "source.bin"
    source.write_bytes(payload)
    target = tmp_path / "out" / "copy.bin"
    assert download_file(source.as_uri(), target) == target
    assert target.read_bytes() == payload
    assert [p.name for p in target.parent.iterdir()] == ["copy.bin"]


def test_download_file_network_failure(tmp_path):
    url = (tmp_path / "missing.bin").as_uri()
    with pytest.raises(RuntimeError) as info:
        download_file(url, tmp_path / "out" / "missing.bin", offline_hint="copy it by hand")
    assert url in str(info.value) and "copy it by hand" in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []


class FakeResponse:
    """A response announcing ``length`` bytes that sends ``chunks``, then raises ``error`` (if any) or ends."""

    def __init__(self, chunks, length, error=None):
        self.chunks, self.error = list(chunks), error
        self.headers = {"Content-Length": str(length)}

    def read(self, size):
        if self.chunks:
            return self.chunks.pop(0)
        if self.error is not None:
            raise self.error
        return b""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


@pytest.mark.parametrize(
    "error, raised",
    [
        (None, RuntimeError),  # the connection closes early: 3 of the 10 announced bytes
        (ConnectionResetError("reset"), RuntimeError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_interrupted_download_keeps_the_old_file(tmp_path, monkeypatch, error, raised):
    response = FakeResponse([b"abc"], 10, error)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: response)
    target = tmp_path / "data.bin"
    target.write_bytes(b"previous copy")
    with pytest.raises(raised):
        download_file("https://example.invalid/data.bin", target)
    assert target.read_bytes() == b"previous copy"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]  # no temporary file left behind


def test_downloaded_file_follows_the_umask(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    previous = os.umask(0o022)
    try:
        target = download_file(source.as_uri(), tmp_path / "out" / "copy.bin")
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "cifar-10-batches-py/../../evil.txt"])
def test_safe_extract_rejects_escaping_members(tmp_path, member):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    destination = tmp_path / "out"
    destination.mkdir()
    with pytest.raises(ValueError, match="refusing"):
        safe_extract(archive, destination)
    assert list(destination.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_safe_extract_rejects_links(tmp_path):
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="not a regular file"):
        safe_extract(archive, tmp_path)
