"""Finding a source's raw files: a local path, the data cache, or a checksum-verified download.

`resolve_files` looks, in this order of precedence, at

1. `path` (`data.source.path`), when it is set: a folder holding the files (or one sub-folder of it, as a zip
   unpacks to `ml-100k/`), one of the files (its folder is used), or a `.zip` (unpacked into the cache). An
   explicit path is authoritative: when the files are not there the run stops instead of quietly reading
   something else from the cache.
2. `<cache_dir>/raw/<name>/` (or one sub-folder of it).
3. a download into that cache folder, only with `allow_download=True` and only for files with a checksum pinned
   in code (md5 or sha256, cited where it was published). A file without a pin is never fetched: unverified
   bytes would silently change every number downstream.

Network access fails fast: each connection and read waits at most `NETWORK_TIMEOUT_S` seconds, and there are no
retries, so an offline machine gets a `SourceError` naming the URL within seconds instead of hanging.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path

from recsys_lab.data.sources.raw import SourceError

NETWORK_TIMEOUT_S = 10.0
# Files up to this size are fingerprinted by content; larger ones by size and modification time (hashing a
# multi-GB ratings file on every run would cost more than the load it guards).
CONTENT_HASH_MAX_BYTES = 64 * 2**20
_CHUNK = 2**20


# ---- checksums ---------------------------------------------------------------------------------------------
def _parse_checksum(checksum: str) -> tuple[str, str]:
    """("md5" | "sha256", hex digest) from "md5:<hex>", "sha256:<hex>" or a bare 32/64-digit hex digest."""
    algorithm, _, digest = checksum.rpartition(":")
    digest = digest.strip().lower()
    if not algorithm:
        algorithm = {32: "md5", 64: "sha256"}.get(len(digest), "")
    if algorithm not in ("md5", "sha256") or len(digest) != {"md5": 32, "sha256": 64}[algorithm]:
        raise SourceError(f"malformed checksum {checksum!r}; expected 'md5:<32 hex>' or 'sha256:<64 hex>'")
    return algorithm, digest


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path, checksum: str, url: str = "", name: str = "") -> None:
    """Raise when `path`'s digest differs from `checksum`; `name` is the file's name in messages."""
    algorithm, expected = _parse_checksum(checksum)
    actual = file_digest(path, algorithm)
    if actual != expected:
        origin = f" downloaded from {url}" if url else ""
        raise SourceError(
            f"checksum mismatch for {name or path.name}{origin}: {algorithm} is {actual}, "
            f"the pinned value is {expected}; "
            f"the file was removed. A changed upstream file would change results, so it is not used: check the "
            f"source, or download it yourself and set data.source.path=<folder>"
        )


def file_fingerprint(paths: Iterable[str | Path]) -> str:
    """Cache key of a set of files: sha256 over each file's name and size, plus its content hash when it is at
    most `CONTENT_HASH_MAX_BYTES`, else its modification time (ns). Folder names are left out, so moving the
    data keeps the cache valid; touching a large file invalidates it (the safe direction)."""
    digest = hashlib.sha256()
    for path in sorted((Path(p) for p in paths), key=lambda p: p.name):
        require_file(path, "a data file")
        try:
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0".encode())
            if stat.st_size <= CONTENT_HASH_MAX_BYTES:
                digest.update(file_digest(path).encode())
            else:
                digest.update(str(stat.st_mtime_ns).encode())
        except OSError as err:  # e.g. no read permission: name the file rather than a bare errno
            raise SourceError(f"{path}: cannot be read ({err.strerror or err})") from err
    return digest.hexdigest()[:16]


# ---- local folders -----------------------------------------------------------------------------------------
def require_file(path: Path, what: str, key: str = "") -> None:
    """Raise unless `path` is a regular file; `key` is the config key that set it (e.g. "data.path")."""
    if path.is_file():
        return
    name = f"{key}={path}" if key else str(path)
    state = "is a directory" if path.is_dir() else "does not exist" if not path.exists() else "is not a file"
    raise SourceError(f"{name} {state}; expected {what}")


def name_missing(folder: Path, names: list[str]) -> str:
    """`names` joined for a message, each that exists in `folder` as something else marked as such."""
    return ", ".join(f"{n} (a directory, not a file)" if (folder / n).is_dir() else n for n in names)


def find_folder(folder: Path, required: list[str]) -> Path | None:
    """`folder` if it holds every required file, else its first sub-folder (by name) that does, else None."""
    if not folder.is_dir():
        return None
    if all((folder / name).is_file() for name in required):
        return folder
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if all((sub / name).is_file() for name in required):
            return sub
    return None


def _missing(folder: Path, required: list[str]) -> tuple[list[str], str]:
    """The required files missing from `folder`, or from its sub-folder that has most of them: the names, and
    the names for a message (one that is there as a directory says so)."""
    candidates = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else [folder]
    best = min(candidates, key=lambda c: sum(not (c / n).is_file() for n in required))
    names = [n for n in required if not (best / n).is_file()]
    return names, name_missing(best, names)


def _extract(archive: Path, dest: Path) -> None:
    """Unpack `archive` into `dest` once; a marker records which archive (name, size, mtime) was unpacked."""
    stat = archive.stat()
    stamp = f"{archive.name} {stat.st_size} {stat.st_mtime_ns}"
    marker = dest / f".extracted-{archive.name}"
    if marker.is_file() and marker.read_text() == stamp:
        return
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(dest)  # ZipFile.extract drops absolute paths and ".." parts
    except zipfile.BadZipFile as err:
        raise SourceError(f"{archive} is not a valid zip file ({err}); download it again") from err
    marker.write_text(stamp)


def _from_path(name: str, required: list[str], path: Path, cache: Path, hint: str) -> Path:
    if not path.exists():
        raise SourceError(f"data.source.path={path} does not exist; it should be a folder holding {required}")
    if path.is_dir() and path.name in required:
        raise SourceError(
            f"data.source.path={path} is a directory, but source {name!r} reads it as a file; expected the "
            f"file {path.name} itself or the folder holding {required}"
        )
    if path.is_file() and path.suffix == ".zip":
        _extract(path, cache)
        folder = find_folder(cache, required)
        where = f"the archive {path} (unpacked into {cache})"
    elif path.is_file():
        if path.name not in required:
            raise SourceError(
                f"data.source.path={path} is a file, but source {name!r} reads {required}: point data.source.path "
                f"at the folder holding them"
            )
        folder = find_folder(path.parent, required)
        where = str(path.parent)
        path = path.parent
    else:
        folder = find_folder(path, required)
        where = str(path)
    if folder is None:
        missing, named = _missing(cache if path.suffix == ".zip" else path, required)
        raise SourceError(
            f"source {name!r}: {named} not found in {where} (nor in one sub-folder of it); put "
            f"{', '.join(missing)} into {path if path.is_dir() else cache} or set "
            f"data.source.path=<folder holding {', '.join(required)}>" + (f"; {hint}" if hint else "")
        )
    return folder


# ---- downloads ---------------------------------------------------------------------------------------------
def _lookup(host: str) -> None:
    """Resolve `host` within NETWORK_TIMEOUT_S: getaddrinfo ignores socket timeouts, so a dead resolver would
    otherwise hang the run; the lookup runs in a daemon thread that is abandoned when it takes too long."""
    errors: list[OSError] = []

    def run() -> None:
        try:
            socket.getaddrinfo(host, None)
        except OSError as err:
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(NETWORK_TIMEOUT_S)
    if thread.is_alive():
        raise TimeoutError(f"looking up {host} took more than {NETWORK_TIMEOUT_S:.0f} s")
    if errors:
        raise urllib.error.URLError(errors[0])


def _open_url(url: str):
    """The one place that touches the network (tests replace it); gives up after NETWORK_TIMEOUT_S without an
    answer from the name lookup, the connection or any read."""
    host = urllib.parse.urlsplit(url).hostname
    if host:
        _lookup(host)
    return urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT_S)


def _download(url: str, checksum: str, target: Path) -> None:
    """Fetch `url` to `target` through a `.part` file, verify it, and only then give it its name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        with _open_url(url) as response, part.open("wb") as out:
            shutil.copyfileobj(response, out, _CHUNK)
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as err:
        part.unlink(missing_ok=True)
        raise SourceError(
            f"could not download {url} ({err}); without network access download it elsewhere and put it into "
            f"{target.parent}, or set data.source.path=<folder>"
        ) from err
    try:
        verify_checksum(part, checksum, url, target.name)
    except SourceError:
        part.unlink(missing_ok=True)
        raise
    part.replace(target)


def _fetch_all(downloads: dict[str, tuple[str, str | None]], cache: Path) -> None:
    unpinned = [url for url, checksum in downloads.values() if not checksum]
    if unpinned:
        raise SourceError(
            f"no pinned checksum for {', '.join(unpinned)}; download it yourself and set "
            f"data.source.path=<folder> (or put the files into {cache})"
        )
    for filename, (url, checksum) in downloads.items():
        target = cache / filename
        if target.is_file():  # an earlier download whose unpacking was interrupted
            try:
                verify_checksum(target, checksum)
            except SourceError:
                target.unlink()
        if not target.is_file():
            _download(url, checksum, target)
        if target.suffix == ".zip":
            _extract(target, cache)


# ---- entry point -------------------------------------------------------------------------------------------
def resolve_files(
    name: str,
    required: list[str],
    path: str | Path | None,
    cache_dir: str | Path,
    downloads: dict[str, tuple[str, str | None]] | None = None,
    allow_download: bool = False,
    hint: str = "",
) -> Path:
    """The folder that holds every file in `required`.

    Args:
        name: source name; the cache folder is `<cache_dir>/raw/<name>/`.
        required: file names that must all be in one folder.
        path: `data.source.path` (folder, one of the files, or a .zip), or None.
        cache_dir: the data cache root (`paths.data_dir`).
        downloads: file name in the cache folder -> (url, checksum); the checksum is "md5:<hex>",
            "sha256:<hex>" or None (never downloaded). Zips are unpacked into the cache folder.
        allow_download: `data.source.allow_download`; off by default so nothing is fetched by surprise.
        hint: appended to the "not found" messages (e.g. other file layouts the source reads).
    """
    cache = Path(cache_dir).expanduser() / "raw" / name
    if path is not None:
        return _from_path(name, required, Path(path).expanduser(), cache, hint)
    folder = find_folder(cache, required)
    if folder is not None:
        return folder
    if downloads and allow_download:
        _fetch_all(downloads, cache)
        folder = find_folder(cache, required)
        if folder is None:
            raise SourceError(
                f"source {name!r}: downloaded {list(downloads)} into {cache}, but {_missing(cache, required)[0]} "
                f"are still missing; the archive layout may have changed"
            )
        return folder
    missing, named = _missing(cache, required)
    message = (
        f"source {name!r}: {named} not found; looked in {cache} (and its sub-folders). Put "
        f"{', '.join(missing)} into {cache} or set data.source.path=<folder holding {', '.join(required)}>"
    )
    if downloads:
        pinned = [url for url, checksum in downloads.values() if checksum]
        if pinned:
            message += (
                f", or set data.source.allow_download=true to fetch {', '.join(pinned)} (checksum-verified)"
            )
        else:
            urls = ", ".join(url for url, _ in downloads.values())
            message += (
                f"; it can be downloaded by hand from {urls} (no checksum is pinned, so it is not fetched)"
            )
    raise SourceError(message)
