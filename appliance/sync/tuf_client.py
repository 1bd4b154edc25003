"""TUF on the device: python-tuf's ngclient proves each metadata file and each model file.

Signatures, thresholds, expiry (freeze attacks), version monotonicity (rollback attacks) and
consistent snapshots are ngclient's (`Updater.refresh`). The model file is downloaded here rather
than by `Updater.download_target`, so that a dropped connection resumes with an HTTP Range request
into a partial file instead of starting over; it is bounded by the signed length and checked with
the library's `TargetFile.verify_length_and_hashes` before anything uses it. Every call blocks
(ngclient is synchronous): the agent runs them in a worker thread.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
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
        self._http = urllib3.PoolManager(headers=headers, retries=False)
        #: Set on shutdown: a download in a worker thread stops at its next chunk (the partial
        #: file stays for the next start) instead of holding the process up.
        self.stopping = threading.Event()
        #: Bytes the last `download` call added to its file (progress despite a dropped line).
        self.gained = 0

    # -- metadata ----------------------------------------------------------------------------
    def refresh(self) -> Updater:
        """Fetch and verify root (rotations), timestamp, snapshot and targets.

        An Updater refreshes once in its life, so each call builds a new one over the same
        metadata directory: what it trusted last time (the newest root, the last timestamp and
        snapshot versions) is what it checks the new files against."""
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
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
                f"{self.base_url}/tuf/metadata/",
                None,
                f"{self.base_url}/tuf/targets/",
                fetcher=_TokenFetcher(self._http, self.timeout_s),
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
            raise Unreachable(f"hub unreachable: {exc}") from None
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
        part = self.partial_path(info)
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        self.gained = 0
        if have < length:
            try:
                have = self._fetch_into(info, part, have, progress)
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
        self, info: TargetFile, part: Path, have: int, progress: Callable[[int, int], None]
    ) -> int:
        length = info.length
        directory, _, basename = info.path.rpartition("/")
        url = f"{self.base_url}/tuf/targets/{directory}/{info.hashes['sha256']}.{basename}"
        headers = dict(self._http.headers)  # request(headers=) replaces the pool's headers
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            response = self._http.request(
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
