"""The package's atomic writer (gblr._files)."""

import os
import threading

import pytest

from gblr._files import write_atomic, write_text_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_writes_bytes_and_text_creating_folders(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"
    assert write_atomic(target, lambda handle: handle.write(b"\x00\x01")) == target
    assert target.read_bytes() == b"\x00\x01"
    text = tmp_path / "report.json"
    assert write_text_atomic(str(text), "héllo\n") == text  # a str path comes back as a Path
    assert text.read_bytes() == "héllo\n".encode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "report.json"]


def test_written_file_follows_the_umask(tmp_path, umask_022):
    fresh = write_text_atomic(tmp_path / "fresh.txt", "x")
    assert fresh.stat().st_mode & 0o777 == 0o644
    existing = tmp_path / "existing.txt"
    existing.write_text("old")
    existing.chmod(0o600)
    write_text_atomic(existing, "new")
    assert existing.stat().st_mode & 0o777 == 0o644  # a new file, with the permissions of a new file


@pytest.mark.parametrize("error", [ValueError("bad"), KeyboardInterrupt()])
def test_failed_write_leaves_the_target_and_no_temporary_file(tmp_path, error):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")

    def write(handle):
        handle.write(b"half of the new")
        raise error

    with pytest.raises(type(error)):
        write_atomic(target, write)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_failed_rename_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()  # a folder: the rename over it fails
    with pytest.raises(OSError):
        write_text_atomic(target, "x")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and list(target.iterdir()) == []


def test_target_is_replaced_atomically(tmp_path):
    """While the new content is being written, the target still holds the old one in full."""
    target = tmp_path / "report.json"
    target.write_text("old")
    seen = []

    def write(handle):
        handle.write(b"ne")
        handle.flush()
        seen.append(target.read_text())  # mid-write: the reader sees the complete old file
        temporary = [p for p in tmp_path.iterdir() if p != target]
        seen.append(len(temporary) == 1 and temporary[0].name.startswith(".report.json."))
        handle.write(b"w")

    inode = target.stat().st_ino
    write_atomic(target, write)
    assert seen == ["old", True]
    assert target.read_text() == "new"
    assert target.stat().st_ino != inode  # renamed into place, not rewritten in place


def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "shared.txt"
    payloads = [str(i) * 10_000 for i in range(8)]
    threads = [threading.Thread(target=write_text_atomic, args=(target, p)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert target.read_text() in payloads  # one whole payload, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]


def test_writable_folder_is_created_and_left_empty(tmp_path, umask_022):
    from gblr._files import check_writable_folder

    folder = tmp_path / "a" / "b"
    assert check_writable_folder(str(folder), "out (--out)") == folder
    assert folder.is_dir() and list(folder.iterdir()) == []  # the probe file is gone
    assert folder.stat().st_mode & 0o777 == 0o755


def test_a_folder_that_cannot_be_used_is_named_with_the_reason(tmp_path):
    from gblr._files import check_writable_folder

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"^out \\(--out\\): {blocker} is a file, not a folder$"):
        check_writable_folder(blocker, "out (--out)")
    with pytest.raises(NotADirectoryError, match=f"{blocker / 'run' / 'deeper'} lies below {blocker}, which is a file"):
        check_writable_folder(blocker / "run" / "deeper", "out (--out)")
    with pytest.raises(OSError, match="^out: cannot write into .* \\(File name too long\\)$"):
        check_writable_folder(tmp_path / ("x" * 300), "out")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
