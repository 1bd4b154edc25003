"""TUF on the device: python-tuf's ngclient proves each metadata file and each model file.

Signatures, thresholds, expiry (freeze attacks), version monotonicity (rollback attacks) and
consistent snapshots are ngclient's (`Updater.refresh`). Metadata and targets come from the
hub's /tuf/ routes (with the device token) or, when `[hub] mirrors` lists any, from those static
mirrors (hub/static.py's layout), tried in order: a mirror that is down, answers 5xx, times out
or serves anything that fails verification is passed over for the next one, and what is finally
used is verified all the same (TUF makes mirrors untrusted; they never see the token).

The model file is downloaded here rather than by `Updater.download_target`, so that a dropped
connection resumes with an HTTP Range request (from any source) into a partial file instead of
starting over; it is bounded by the signed length and checked with the library's
`TargetFile.verify_length_and_hashes` before anything uses it. Every call blocks (ngclient is
synchronous): the agent runs them in a worker thread.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api._payload import TargetFile  # what tuf.api.metadata re-exports
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from ..errors import is_disk_full

log = logging.getLogger("appliance.sync.tuf")

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
CHUNK = 64 * 1024


class SyncError(Exception):
    """A sync step failed; `stage` names it for status and telemetry."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class Unreachable(SyncError):
    """The hub could not be reached or answered badly: retried later, nothing is wrong locally."""

    def __init__(self, reason: str) -> None:
        super().__init__("download", reason)


class Refused(SyncError):
    """Verification refused metadata or a file (an attack, or a broken hub)."""

    def __init__(self, reason: str) -> None:
        super().__init__("verify", reason)


class Expired(Refused):
    """Metadata is past its expiry: updates stop until the hub signs fresh metadata."""


class _TokenFetcher(FetcherInterface):
    """ngclient's fetcher with the device token on every request, and no retries of its own."""

    def __init__(self, http: urllib3.PoolManager, timeout: float) -> None:
        self._http = http
        self._timeout = timeout

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._http.request(
                "GET", url, preload_content=False, timeout=urllib3.Timeout(self._timeout)
            )
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_errors.SlowRetrievalError from exc
        if response.status >= 400:
            _discard(response)
            raise tuf_errors.DownloadHTTPError(
                f"HTTP {response.status} from {url}", response.status
            )
        return self._chunks(response)

    @staticmethod
    def _chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from response.stream(CHUNK)
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_errors.SlowRetrievalError from exc
        finally:
            _discard(response)


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back only when its response was read to the end: a connection with
    unread body bytes left in it would answer the next request with them."""
    if not response.closed:
        response.close()
    response.release_conn()


@dataclass(frozen=True)
class Source:
    """One place the TUF files come from: `base` holds metadata/ and targets/."""

    base: str
    http: urllib3.PoolManager

    @property
    def metadata_url(self) -> str:
        return f"{self.base}/metadata/"

    @property
    def targets_url(self) -> str:
        return f"{self.base}/targets/"


def _combined(failures: list[tuple[Source, SyncError]]) -> SyncError:
    """One error for every source failing: a refusal (an attack, or a broken repository)
    outranks a source being unreachable; all of them expired is an expiry."""
    if len(failures) == 1:
        return failures[0][1]
    reason = "; ".join(f"{src.base}: {exc.reason}" for src, exc in failures)
    errors = [exc for _, exc in failures]
    if all(isinstance(e, Expired) for e in errors):
        return Expired(reason)
    if any(isinstance(e, Refused) for e in errors):
        return Refused(reason)
    return Unreachable(reason)


class TufClient:
    """The device's view of the hub's TUF repository, kept under `metadata_dir`."""

    def __init__(
        self,
        base_url: str,
        token: str,
        device_id: str,
        root_file: Path,
        metadata_dir: Path,
        download_dir: Path,
        timeout_s: float,
        max_download_bytes: int,
        mirrors: Sequence[str] = (),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.root_file = root_file
        self.metadata_dir = metadata_dir
        self.download_dir = download_dir
        self.timeout_s = timeout_s
        self.max_download_bytes = max_download_bytes
        headers = {"Authorization": f"Bearer {token}", "User-Agent": "appliance-sync"}
        if device_id:
            headers["X-Device-Id"] = device_id
        self.mirrored = bool(mirrors)
        if mirrors:  # untrusted: no token, no device id
            plain = urllib3.PoolManager(headers={"User-Agent": "appliance-sync"}, retries=False)
            self.sources = [Source(m.rstrip("/"), plain) for m in mirrors]
        else:
            hub = urllib3.PoolManager(headers=headers, retries=False)
            self.sources = [Source(f"{self.base_url}/tuf", hub)]
        #: (source, "metadata" | "target", "ok" | "failed" | "refused" | "behind") -> count.
        self.fetches: dict[tuple[str, str, str], int] = {}
        #: The source that served the last verified metadata and the last verified target.
        self.served_by: dict[str, str] = {}
        #: Set on shutdown: a download in a worker thread stops at its next chunk (the partial
        #: file stays for the next start) instead of holding the process up.
        self.stopping = threading.Event()
        #: Bytes the last `download` call added to its file (progress despite a dropped line).
        self.gained = 0

    # -- metadata ----------------------------------------------------------------------------
    def refresh(self, wanted: Sequence[str] = ()) -> Updater:
        """Fetch and verify root (rotations), timestamp, snapshot and targets, from the first
        source that gives metadata that verifies and lists every `wanted` target path.

        A mirror whose metadata verifies but lacks a wanted target is behind (a LAN cache not
        yet synced): the next one is asked, and when none lists it, the last metadata that
        verified is used (the agent then refuses the unlisted target and retries later).

        An Updater refreshes once in its life, so each call builds a new one over the same
        metadata directory: what it trusted last time (the newest root, the last timestamp and
        snapshot versions) is what it checks the new files against; a source that failed half
        way left only files that verified."""
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        failures: list[tuple[Source, SyncError]] = []
        behind: tuple[Source, Updater] | None = None
        for i, src in enumerate(self.sources):
            try:
                updater = self._refresh_from(src)
            except SyncError as exc:
                self._count(src, "metadata", exc)
                failures.append((src, exc))
                if len(self.sources) > 1:
                    log.warning("TUF metadata from %s failed: %s", src.base, exc.reason)
                continue
            missing = [p for p in wanted if updater.get_targetinfo(p) is None]
            if missing and i + 1 < len(self.sources):
                self._count(src, "metadata", None, "behind")
                log.warning("mirror %s does not list %s yet: asking the next", src.base, missing)
                behind = (src, updater)
                continue
            return self._served(src, updater, "ok", bool(failures))
        if behind is not None:
            return self._served(*behind, None, True)
        raise _combined(failures)

    def _served(self, src: Source, updater: Updater, result: str | None, say: bool) -> Updater:
        if result is not None:
            self._count(src, "metadata", None, result)
        if self.served_by.get("metadata") != src.base or say:
            log.info("TUF metadata verified from %s", src.base)
        self.served_by["metadata"] = src.base
        return updater

    def _count(self, src: Source, what: str, exc: SyncError | None, result: str = "ok") -> None:
        if exc is not None:
            result = "refused" if isinstance(exc, Refused) else "failed"
        key = (src.base, what, result)
        self.fetches[key] = self.fetches.get(key, 0) + 1

    def _refresh_from(self, src: Source) -> Updater:
        bootstrap = None
        if not (self.metadata_dir / "root.json").exists():
            try:
                bootstrap = self.root_file.read_bytes()
            except OSError as exc:
                raise Refused(
                    f"cannot read the trusted root metadata {self.root_file}: {exc.strerror}"
                ) from None
        try:
            updater = Updater(
                str(self.metadata_dir),
                src.metadata_url,
                None,
                src.targets_url,
                fetcher=_TokenFetcher(src.http, self.timeout_s),
                config=UpdaterConfig(app_user_agent="appliance-sync"),
                bootstrap=bootstrap,
            )
            updater.refresh()
        except tuf_errors.ExpiredMetadataError as exc:
            raise Expired(f"TUF metadata expired: {exc}") from None
        except tuf_errors.RepositoryError as exc:
            raise Refused(f"TUF metadata refused ({type(exc).__name__}): {exc}") from None
        except tuf_errors.DownloadError as exc:
            cause = exc.__cause__ or exc.__context__
            why = f"{exc}" + (f": {cause}" if cause is not None else "")
            raise Unreachable(f"TUF metadata download failed: {why}") from None
        except urllib3.exceptions.HTTPError as exc:
            where = "mirror" if self.mirrored else "hub"
            raise Unreachable(f"{where} unreachable: {exc}") from None
        return updater

    # -- targets -----------------------------------------------------------------------------
    def partial_path(self, info: TargetFile) -> Path:
        return self.download_dir / f"{self._stem(info)}.part"

    def _stem(self, info: TargetFile) -> str:
        suffix = Path(info.path.rsplit("/", 1)[-1]).suffix.lower()
        return f"{info.hashes['sha256']}{suffix}"

    def discard(self, info: TargetFile) -> None:
        """Delete what a download of this target left (it is in the store already)."""
        self.partial_path(info).unlink(missing_ok=True)
        (self.download_dir / self._stem(info)).unlink(missing_ok=True)

    def download(self, info: TargetFile, progress: Callable[[int, int], None]) -> Path:
        """Download (or resume) the target into the download directory and verify it.

        Returns the verified file. A dropped connection raises Unreachable and keeps the
        partial file for the next try; a file that fails verification is deleted."""
        length = info.length
        if "sha256" not in info.hashes:
            raise Refused(f"target {info.path} is signed without a sha256 hash")
        if length > self.max_download_bytes:
            raise Refused(
                f"target {info.path} is {length} bytes, more than hub.max_download_bytes "
                f"({self.max_download_bytes})"
            )
        self.download_dir.mkdir(parents=True, exist_ok=True)
        final = self.download_dir / self._stem(info)
        if final.exists():  # verified before a restart, not yet stored: check it again
            try:
                with final.open("rb") as f:
                    info.verify_length_and_hashes(f)
                return final
            except tuf_errors.LengthOrHashMismatchError:
                final.unlink()
        self.gained = 0
        failures: list[tuple[Source, SyncError]] = []
        for src in self.sources:
            try:
                path = self._download_from(src, info, final, progress)
            except SyncError as exc:
                self._count(src, "target", exc)
                failures.append((src, exc))
                if self.stopping.is_set():
                    raise
                if len(self.sources) > 1:
                    log.warning("download of %s from %s failed: %s", info.path, src.base, exc)
                continue
            self._count(src, "target", None)
            self.served_by["target"] = src.base
            log.info("downloaded and verified %s from %s", info.path, src.base)
            return path
        raise _combined(failures)

    def _download_from(
        self, src: Source, info: TargetFile, final: Path, progress: Callable[[int, int], None]
    ) -> Path:
        """Download (or resume what an earlier try left, whoever served it) from one source."""
        length = info.length
        part = self.partial_path(info)
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        if have < length:
            try:
                have = self._fetch_into(src, info, part, have, progress)
            except Refused:
                part.unlink(missing_ok=True)
                raise
            except OSError as exc:
                if is_disk_full(exc):  # the partial file would keep the disk full for everyone
                    part.unlink(missing_ok=True)
                raise
        progress(have, length)
        try:
            with part.open("rb") as f:
                info.verify_length_and_hashes(f)
        except tuf_errors.LengthOrHashMismatchError as exc:
            part.unlink(missing_ok=True)
            raise Refused(f"target {info.path} failed verification: {exc}") from None
        part.replace(final)
        return final

    def _fetch_into(
        self,
        src: Source,
        info: TargetFile,
        part: Path,
        have: int,
        progress: Callable[[int, int], None],
    ) -> int:
        length = info.length
        directory, _, basename = info.path.rpartition("/")
        url = f"{src.targets_url}{directory}/{info.hashes['sha256']}.{basename}"
        headers = dict(src.http.headers)  # request(headers=) replaces the pool's headers
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = src.http.request(
                "GET",
                url,
                headers=headers,
                preload_content=False,
                timeout=urllib3.Timeout(self.timeout_s),
            )
        except urllib3.exceptions.HTTPError as exc:
            raise Unreachable(f"download of {info.path} failed: {exc}") from None
        try:
            start = self._check_response(response, info, have)
            if start == 0:
                have = 0
            with part.open("r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                try:
                    for chunk in response.stream(CHUNK):
                        if self.stopping.is_set():
                            raise Unreachable(f"download of {info.path} stopped: shutting down")
                        room = length - have
                        f.write(chunk[:room])
                        have += min(len(chunk), room)
                        self.gained += min(len(chunk), room)
                        progress(have, length)
                        if len(chunk) > room:
                            raise Refused(
                                f"target {info.path}: the hub sent more than the signed "
                                f"length of {length} bytes"
                            )
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    if is_disk_full(exc):
                        raise  # not the line: the caller frees the space and retries later
                    raise Unreachable(
                        f"download of {info.path} interrupted at {have} of {length} bytes: {exc}"
                    ) from None
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        finally:
            _discard(response)
        if have < length:
            raise Unreachable(f"download of {info.path} ended at {have} of {length} bytes")
        return have

    def _check_response(
        self, response: urllib3.BaseHTTPResponse, info: TargetFile, have: int
    ) -> int:
        """Where the body starts and how long the hub says the file is; refuses a file whose
        size differs from the signed length before reading any of it."""
        if response.status == 416:
            raise Unreachable(f"the hub refused to resume {info.path} at byte {have}")
        if response.status >= 400:
            raise Unreachable(f"download of {info.path}: HTTP {response.status}")
        if response.status == 206:
            m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != have:
                raise Unreachable(f"download of {info.path}: unusable Content-Range")
            start, total = have, int(m.group(3))
        elif response.status == 200:
            start = 0
            raw = response.headers.get("Content-Length")
            total = int(raw) if raw is not None and raw.isdigit() else info.length
        else:
            raise Unreachable(f"download of {info.path}: unexpected HTTP {response.status}")
        if total != info.length:
            raise Refused(
                f"target {info.path}: the hub's file is {total} bytes, the signed length is "
                f"{info.length}"
            )
        return start
