"""Finding a source's files (`recsys_lab/data/sources/files.py`): path forms, the cache, checksum-verified
downloads and the files' fingerprint.

No test touches the network: downloads go to `file://` URLs, a refused local port, or a patched opener.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from recsys_lab.data.sources import files
from recsys_lab.data.sources.files import file_fingerprint, resolve_files
from recsys_lab.data.sources.raw import SourceError
from tests.source_fixtures import write, write_archive


@pytest.fixture
def archive(tmp_path) -> Path:
    return write_archive(tmp_path / "src" / "data.zip")


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_download_verified_and_unpacked(tmp_path, archive, algorithm):
    digest = hashlib.new(algorithm, archive.read_bytes()).hexdigest()
    folder = resolve_files(
        "toy",
        ["a.txt", "b.txt"],
        path=None,
        cache_dir=str(tmp_path / "cache"),
        downloads={"data.zip": (archive.as_uri(), f"{algorithm}:{digest}")},
        allow_download=True,
    )
    assert folder == tmp_path / "cache" / "raw" / "toy" / "data"
    assert (folder / "a.txt").read_text() == "hello"


def test_download_checksum_mismatch(tmp_path, archive):
    cache = tmp_path / "cache"
    with pytest.raises(
        SourceError, match=r"checksum mismatch for data.zip downloaded from file://.*pinned value is 0+"
    ):
        resolve_files(
            "toy",
            ["a.txt"],
            path=None,
            cache_dir=str(cache),
            downloads={"data.zip": (archive.as_uri(), "sha256:" + "0" * 64)},
            allow_download=True,
        )
    assert not list((cache / "raw" / "toy").iterdir())  # neither the file nor its .part is kept


def test_download_unreachable_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"could not download http://127.0.0.1:9/data.zip"):
        resolve_files(
            "toy",
            ["a.txt"],
            path=None,
            cache_dir=str(tmp_path),
            downloads={"data.zip": ("http://127.0.0.1:9/data.zip", "md5:" + "0" * 32)},
            allow_download=True,
        )
    assert time.monotonic() - start < files.NETWORK_TIMEOUT_S + 2


def test_download_hanging_name_lookup_gives_up(tmp_path, monkeypatch):
    """getaddrinfo ignores socket timeouts: a resolver that never answers must not hang the run."""
    monkeypatch.setattr(files, "NETWORK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(files.socket, "getaddrinfo", lambda *args: time.sleep(3))
    start = time.monotonic()
    with pytest.raises(SourceError, match=r"could not download http://grouplens.invalid/x.zip \(looking up"):
        resolve_files(
            "toy",
            ["a.txt"],
            None,
            str(tmp_path),
            {"x.zip": ("http://grouplens.invalid/x.zip", "md5:" + "0" * 32)},
            True,
        )
    assert time.monotonic() - start < 2


def test_download_off_by_default_and_unpinned_refused(tmp_path, archive, monkeypatch):
    monkeypatch.setattr(files, "_open_url", lambda url: pytest.fail("no network access expected"))
    with pytest.raises(
        SourceError, match=r"a.txt not found; looked in .*allow_download=true to fetch file://"
    ):
        resolve_files(
            "toy", ["a.txt"], None, str(tmp_path), {"data.zip": (archive.as_uri(), "md5:" + "0" * 32)}
        )
    with pytest.raises(SourceError, match=r"no pinned checksum for file://.*data.zip; download it yourself"):
        resolve_files("toy", ["a.txt"], None, str(tmp_path), {"data.zip": (archive.as_uri(), None)}, True)


def test_resolve_path_forms(tmp_path):
    folder = tmp_path / "d"
    write(folder / "a.txt", "1")
    write(folder / "b.txt", "2")
    assert resolve_files("toy", ["a.txt", "b.txt"], str(folder), str(tmp_path)) == folder
    assert resolve_files("toy", ["a.txt", "b.txt"], str(folder / "a.txt"), str(tmp_path)) == folder
    assert (
        resolve_files("toy", ["a.txt", "b.txt"], str(tmp_path), str(tmp_path / "c")) == folder
    )  # one level down
    with pytest.raises(SourceError, match=r"does not exist"):
        resolve_files("toy", ["a.txt"], str(tmp_path / "nope"), str(tmp_path))
    with pytest.raises(SourceError, match=r"c.txt not found in .*put c.txt into"):
        resolve_files("toy", ["a.txt", "c.txt"], str(folder), str(tmp_path))


def test_file_fingerprint(tmp_path):
    a = write(tmp_path / "x" / "f.txt", "same")
    b = write(tmp_path / "y" / "f.txt", "same")
    assert file_fingerprint([a]) == file_fingerprint([b])  # folder names do not matter
    write(b, "diff")
    assert file_fingerprint([a]) != file_fingerprint([b])


def test_file_fingerprint_of_a_path_that_is_not_a_file(tmp_path):
    """Sources call it from fingerprint(), before load(): it used to raise a bare IsADirectoryError or
    FileNotFoundError without saying what was expected."""
    (tmp_path / "d").mkdir()
    with pytest.raises(SourceError, match=r"/d is a directory; expected a data file"):
        file_fingerprint([tmp_path / "d"])
    with pytest.raises(SourceError, match=r"/nope.txt does not exist; expected a data file"):
        file_fingerprint([tmp_path / "nope.txt"])


def test_resolve_names_a_required_file_that_is_a_directory(tmp_path):
    folder = tmp_path / "d"
    write(folder / "a.txt", "1")
    (folder / "b.txt").mkdir()
    with pytest.raises(
        SourceError,
        match=r"source 'toy': b.txt \(a directory, not a file\) not found in .*/d .*put b.txt into",
    ):
        resolve_files("toy", ["a.txt", "b.txt"], str(folder), str(tmp_path))
    (tmp_path / "cache" / "raw" / "toy").mkdir(parents=True)
    (tmp_path / "cache" / "raw" / "toy" / "b.txt").mkdir()
    with pytest.raises(SourceError, match=r"a.txt, b.txt \(a directory, not a file\) not found; looked in"):
        resolve_files("toy", ["a.txt", "b.txt"], None, str(tmp_path / "cache"))


def test_resolve_path_that_is_a_directory_named_like_a_required_file(tmp_path):
    (tmp_path / "a.txt").mkdir()
    with pytest.raises(
        SourceError,
        match=r"data.source.path=.*a.txt is a directory, but source 'toy' reads it as a file; expected the file "
        r"a.txt itself or the folder holding \['a.txt'\]",
    ):
        resolve_files("toy", ["a.txt"], str(tmp_path / "a.txt"), str(tmp_path))
