"""The one atomic write (fcnseg.utils.atomic): the content after, the previous file untouched and no
temporary left when a write fails, a read-only folder or a full disk as one sentence."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcnseg.errors import UserError
from fcnseg.utils.atomic import AtomicWriteError, atomic_path, temporary_pattern, write_atomic


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("data", [b"\x00\x01bytes\xff", "text, \u00e9t\u00e9 in UTF-8\n"])
def test_write_atomic_writes_the_content_with_the_usual_mode(tmp_path, data):
    path = tmp_path / "new" / "folder" / "file.bin"
    assert write_atomic(path, data) == path
    expected = data.encode("utf-8") if isinstance(data, str) else data
    assert path.read_bytes() == expected
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's private 0600
    assert [p.name for p in path.parent.iterdir()] == ["file.bin"]


def test_write_atomic_replaces_a_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_an_exception_mid_write_leaves_the_file_untouched_and_no_temporary(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"previous content")
    before = _sha(path)
    with pytest.raises(KeyError, match="mid-write"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half of the new cont")
        assert tmp.parent == tmp_path and tmp != path
        raise KeyError("mid-write")
    assert _sha(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_an_exception_before_any_file_existed_leaves_nothing(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("{")
        raise RuntimeError("serialiser failed")
    assert list(tmp_path.iterdir()) == []


def test_torch_save_and_pil_write_through_the_temporary_path(tmp_path):
    """torch.save takes any name; PIL picks the format from the extension, kept by the temporary."""
    state = {"w": torch.arange(6.0).view(2, 3)}
    with atomic_path(tmp_path / "m.pt") as tmp:
        torch.save(state, tmp)
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], state["w"])
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    with atomic_path(tmp_path / "p.png") as tmp:
        assert tmp.suffix == ".png"
        Image.fromarray(pixels).save(tmp)
    with Image.open(tmp_path / "p.png") as image:
        assert image.format == "PNG"
        assert np.array_equal(np.asarray(image), pixels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "p.png"]


def test_without_replace_an_existing_file_is_kept(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("theirs")
    with pytest.raises(FileExistsError):
        write_atomic(path, "ours", replace=False)
    assert path.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    write_atomic(tmp_path / "new.json", "ours", replace=False)
    assert (tmp_path / "new.json").read_text() == "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "new.json"]


@pytest.mark.parametrize("replace", [True, False])
def test_a_file_in_place_of_the_folder_is_one_sentence(tmp_path, replace):
    (tmp_path / "runs").write_text("a file")
    path = tmp_path / "runs" / "metrics" / "out.json"
    with pytest.raises(AtomicWriteError) as err:
        write_atomic(path, "{}", replace=replace)
    assert str(err.value) == (
        f"cannot write {path} ({tmp_path / 'runs'} is a file, not a folder); nothing was written"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]


def test_the_temporary_pattern_matches_the_temporary_name(tmp_path):
    path = tmp_path / "best.pt"
    with atomic_path(path) as tmp:
        assert list(tmp_path.glob(temporary_pattern(path))) == [tmp]
        tmp.write_bytes(b"x")
    assert list(tmp_path.glob(temporary_pattern(path))) == []


_CHILD = """
import sys
from fcnseg.utils.atomic import write_atomic
try:
    write_atomic(sys.argv[1], b"x" * int(sys.argv[2]))
except Exception as err:
    print(type(err).__name__, isinstance(err, OSError), err.errno, str(err), sep="|", end="|")
import os
print(*sorted(os.listdir(os.path.dirname(sys.argv[1]))), sep=",")
"""


def _in_mount_namespace(setup: str, *args: str) -> str:
    """Runs ``_CHILD`` with ``args`` in a private mount namespace after the shell ``setup``
    (a read-only folder must be a mount: root writes through file modes)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare")
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("user namespaces are not available here")
    quoted = " ".join(f"'{a}'" for a in args)
    script = f"{setup} && exec '{sys.executable}' -c '{_CHILD}' {quoted}"
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_read_only_folder_is_one_sentence_naming_the_file(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "f.txt").write_text("kept")
    setup = f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"
    out = _in_mount_namespace(setup, str(folder / "f.txt"), "3")
    name, is_os_error, code, message, listing = out.split("|")
    assert name == "AtomicWriteError" and is_os_error == "True" and code == "30"  # EROFS
    assert message == (
        f"cannot write {folder / 'f.txt'} (the folder {folder} is read-only); "
        "the previous f.txt is unchanged"
    )
    assert listing == "f.txt"
    assert (folder / "f.txt").read_text() == "kept"
    assert [p.name for p in folder.iterdir()] == ["f.txt"]


def test_a_full_disk_is_one_sentence_and_leaves_no_temporary(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    setup = f"mount -t tmpfs -o size=64k tmpfs {folder}"
    out = _in_mount_namespace(setup, str(folder / "big.bin"), str(2**20))
    name, _, code, message, listing = out.split("|")
    assert listing == ""  # the temporary file is gone
    assert name == "AtomicWriteError" and code == "28"  # ENOSPC
    assert message.startswith(f"cannot write {folder / 'big.bin'} (no space left on device, ")
    assert message.endswith("MB free); nothing was written")


def test_the_error_is_a_user_error_and_an_os_error():
    err = AtomicWriteError(13, "cannot write x (denied); nothing was written")
    assert isinstance(err, UserError) and isinstance(err, OSError)
    assert str(err) == "cannot write x (denied); nothing was written" and err.errno == 13
