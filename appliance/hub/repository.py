"""The hub as a TUF repository (python-tuf's Metadata API; devices run tuf.ngclient.Updater).

Roles root, targets, snapshot and timestamp, one ed25519 key each, threshold 1, consistent
snapshots. The root key is generated into a separate directory that is meant to leave the
machine (`appliance hub init --root-key-dir`); the three online keys stay in DATA/keys so the
hub can publish and re-sign unattended. Every publish adds a target and bumps targets, snapshot
and timestamp; `refresh()` re-signs a role once less than half of its lifetime is left, so a
running hub never lets timestamp (1 day) or snapshot (7 days) expire. Root cannot be re-signed
online: `rotate()` with the offline key writes the next root version.

Metadata bytes live in the HubStore (table `metadata`), written inside one store transaction
per change, so a publish from the CLI and the server's re-signing never interleave.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from ..errors import ConfigError
from .storage import HubStore

log = logging.getLogger("appliance.hub.tuf")

ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
#: Versions of targets, snapshot and timestamp kept and served (root keeps every version).
KEEP_VERSIONS = 10


@dataclass(frozen=True)
class Expiry:
    """Lifetimes of each role's metadata, in seconds."""

    root: float = 365 * 86400.0
    targets: float = 90 * 86400.0
    snapshot: float = 7 * 86400.0
    timestamp: float = 86400.0

    def of(self, role: str) -> dt.timedelta:
        seconds: float = getattr(self, role)
        return dt.timedelta(seconds=seconds)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (0600 from creation, not chmod afterwards)."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load_signer(path: Path) -> CryptoSigner:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from None
    private = load_pem_private_key(pem, None)
    return CryptoSigner(private)


class TufRepository:
    """Reads and signs the four top-level roles kept in a HubStore."""

    def __init__(self, store: HubStore, key_dir: Path, expiry: Expiry | None = None) -> None:
        self.store = store
        self.key_dir = key_dir
        self.expiry = expiry or Expiry()
        self._signers: dict[str, CryptoSigner] = {}

    # -- keys --------------------------------------------------------------------------------
    def signer(self, role: str) -> CryptoSigner:
        """The online key root lists for `role`, re-read from disk when root changed it (a
        rotation from the CLI while this hub runs)."""
        if role not in ONLINE_ROLES:
            raise ValueError(f"{role} is not an online role")
        keyids = self.load("root", Root).signed.roles[role].keyids
        cached = self._signers.get(role)
        if cached is None or cached.public_key.keyid not in keyids:
            path = self.key_dir / f"{role}.pem"
            cached = load_signer(path)
            if cached.public_key.keyid not in keyids:
                raise ConfigError(f"{path} is not the {role} key that root metadata lists")
            self._signers[role] = cached
        return cached

    # -- reading -----------------------------------------------------------------------------
    def load(self, role: str, cls: type[Signed]) -> Metadata[Any]:
        found = self.store.latest_metadata(role)
        if found is None:
            raise ConfigError(f"the hub has no {role} metadata: run `appliance hub init` first")
        md: Metadata[Any] = Metadata.from_bytes(found[1])
        if not isinstance(md.signed, cls):
            raise ConfigError(f"stored {role} metadata holds a {type(md.signed).__name__}")
        return md

    def root_bytes(self, version: int | None = None) -> bytes:
        if version is None:
            found = self.store.latest_metadata("root")
            if found is None:
                raise ConfigError("the hub has no root metadata: run `appliance hub init` first")
            return found[1]
        body = self.store.metadata("root", version)
        if body is None:
            raise ConfigError(f"the hub has no root metadata version {version}")
        return body

    def expires(self) -> dict[str, dt.datetime]:
        """Each role's current expiry (for metrics and `appliance hub status`)."""
        out = {}
        for role, cls in (
            ("root", Root),
            ("targets", Targets),
            ("snapshot", Snapshot),
            ("timestamp", Timestamp),
        ):
            out[role] = self.load(role, cls).signed.expires
        return out

    # -- writing -----------------------------------------------------------------------------
    def _store(self, role: str, md: Metadata[Any], signers: list[CryptoSigner]) -> None:
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        self.store.put_metadata(role, md.signed.version, md.to_bytes())
        if role != "root":
            # A client mid-update may still ask for a version the previous timestamp named;
            # older ones are never asked for again (every targets.json is a full copy).
            self.store.prune_metadata(role, md.signed.version - KEEP_VERSIONS + 1)

    def _bump(self, md: Metadata[Any], role: str, now: dt.datetime) -> None:
        md.signed.version += 1
        md.signed.expires = now + self.expiry.of(role)

    def _chain(
        self, from_role: str, now: dt.datetime, targets: Metadata[Any] | None = None
    ) -> None:
        """Bump and re-sign `from_role` and every role below it (targets > snapshot > timestamp).

        `targets`: an edited targets metadata to sign instead of the stored one. The caller
        holds the store transaction."""
        order = list(ONLINE_ROLES)
        roles = order[order.index(from_role) :]
        snap: Metadata[Any] | None = None
        if "targets" in roles:
            targets = targets or self.load("targets", Targets)
            self._bump(targets, "targets", now)
            self._store("targets", targets, [self.signer("targets")])
            snap = self.load("snapshot", Snapshot)
            snap.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        ts = self.load("timestamp", Timestamp)
        if "snapshot" in roles:
            snap = snap or self.load("snapshot", Snapshot)
            self._bump(snap, "snapshot", now)
            self._store("snapshot", snap, [self.signer("snapshot")])
            ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
        self._bump(ts, "timestamp", now)
        self._store("timestamp", ts, [self.signer("timestamp")])

    def add_target(
        self, path: str, length: int, sha256: str, custom: dict[str, Any], also: Callable[[], None]
    ) -> int:
        """Add a target and re-sign targets, snapshot and timestamp, in one transaction.

        `also` runs inside that transaction (the caller records the target in its own table),
        so the database and the signed metadata never disagree. Returns the targets version."""
        with self.store.transaction():
            now = utcnow()
            targets = self.load("targets", Targets)
            targets.signed.targets[path] = TargetFile(
                length, {"sha256": sha256}, path, {"custom": custom}
            )
            self._chain("targets", now, targets)
            also()
            return int(targets.signed.version)

    def refresh(self, now: dt.datetime | None = None) -> list[str]:
        """Re-sign every online role with less than half of its lifetime left.

        Returns the roles re-signed (a bumped role re-signs those below it too)."""
        now = now or utcnow()
        root_left = self.load("root", Root).signed.expires - now
        if root_left < self.expiry.of("root") / 12:
            log.warning(
                "root metadata expires in %.1f days: bring the offline root key and run "
                "`appliance hub rotate-key root` (devices stop updating once it expires)",
                root_left.total_seconds() / 86400,
            )
        with self.store.transaction():
            for role, cls in (
                ("targets", Targets),
                ("snapshot", Snapshot),
                ("timestamp", Timestamp),
            ):
                expires = self.load(role, cls).signed.expires
                if expires - now < self.expiry.of(role) / 2:
                    self._chain(role, now)
                    done = list(ONLINE_ROLES)[list(ONLINE_ROLES).index(role) :]
                    log.info("re-signed %s metadata before it expires", ", ".join(done))
                    return done
        return []

    def rotate(self, role: str, root_key_dir: Path) -> int:
        """Replace `role`'s key and sign the next root version with the offline root key.

        Rotating root signs the new root with both the old and the new root key (a client
        trusts version N+1 only if N's keys and N+1's keys both sign it). The new private key
        replaces the old one on disk; the old one is kept as `<role>.pem.retired-<keyid>`.
        Returns the new root version."""
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
        root_path = root_key_dir / "root.pem"
        old_root_signer = load_signer(root_path)
        new_signer = CryptoSigner.generate_ed25519()
        key_path = root_path if role == "root" else self.key_dir / f"{role}.pem"
        # Written before the new root is committed, renamed into place after: a crash in
        # between leaves the new key in `.new`, never a root that lists a key nobody has.
        pending = key_path.with_name(f"{key_path.name}.new")
        write_private(pending, new_signer.private_bytes)
        try:
            with self.store.transaction():
                now = utcnow()
                root = self.load("root", Root)
                if old_root_signer.public_key.keyid not in root.signed.roles["root"].keyids:
                    raise ConfigError(f"{root_path} is not the hub's current root key")
                for keyid in list(root.signed.roles[role].keyids):
                    root.signed.revoke_key(keyid, role)
                root.signed.add_key(new_signer.public_key, role)
                self._bump(root, "root", now)
                signers = [old_root_signer] + ([new_signer] if role == "root" else [])
                self._store("root", root, signers)
                if role != "root":
                    # New keys invalidate what the old key signed: re-sign with the new one now.
                    self._signers[role] = new_signer
                    self._chain(role, now)
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        old = key_path.read_bytes() if key_path.exists() else b""
        if old:
            old_id = CryptoSigner(load_pem_private_key(old, None)).public_key.keyid
            write_private(key_path.with_name(f"{key_path.name}.retired-{old_id[:16]}"), old)
        pending.replace(key_path)
        return int(root.signed.version)


def init_repository(
    store: HubStore, key_dir: Path, root_key_dir: Path, expiry: Expiry | None = None
) -> bytes:
    """Generate the four keys and version 1 of every role; returns 1.root.json's bytes."""
    expiry = expiry or Expiry()
    if store.latest_metadata("root") is not None:
        raise ConfigError("this hub already has TUF metadata; it is initialised once")
    if (root_key_dir / "root.pem").exists():
        raise ConfigError(f"{root_key_dir / 'root.pem'} exists already: refusing to replace it")
    now = utcnow()
    signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
    write_private(root_key_dir / "root.pem", signers["root"].private_bytes)
    for role in ONLINE_ROLES:
        write_private(key_dir / f"{role}.pem", signers[role].private_bytes)
    root = Root(expires=now + expiry.of("root"), consistent_snapshot=True)
    for role in ROLES:
        root.add_key(signers[role].public_key, role)
    roles: dict[str, Root | Targets | Snapshot | Timestamp] = {
        "root": root,
        "targets": Targets(expires=now + expiry.of("targets")),
        "snapshot": Snapshot(expires=now + expiry.of("snapshot")),
        "timestamp": Timestamp(expires=now + expiry.of("timestamp")),
    }
    with store.transaction():
        for role in ROLES:
            md: Metadata[Any] = Metadata(roles[role])
            md.sign(signers[role])
            store.put_metadata(role, 1, md.to_bytes())
    found = store.latest_metadata("root")
    assert found is not None
    return found[1]
