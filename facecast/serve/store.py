"""The coordination store of a facecast cluster (``serve --role ingest|worker``): Redis.

One ingest and many workers share nothing but this store and the ingest's RTMP server.
Everything they agree on lives here, under the ``facecast:`` prefix:

- ``ingest``: where workers read and publish (the ingest's RTMP base URL) and the worker
  secret nginx checks on those URLs. Written by the ingest at start.
- ``published:KEY``: a key a publisher is pushing to the ingest now; its value is nginx's
  client id of that publisher, so a new publish on the key reads differently. The ingest
  refreshes it every second with an expiry of a few: a dead ingest takes its keys with it.
- ``lease:KEY``: the worker that runs KEY. Taken with SET NX and an expiry, renewed by its
  owner only (a compare-and-set script): a worker that dies stops renewing, and its keys
  are free again when the lease runs out. Exactly one worker holds a key at a time.
- ``worker:ID``: each worker's heartbeat (capacity, streams it runs), with an expiry: who is
  alive and how loaded, so a key goes to the least loaded worker.
- ``profiles``: a hash, key -> the profile in force (JSON, images by content hash), and
  ``blob:SHA256``: the images themselves. Workers on other machines read the photos from
  here, not from the ingest's disk.
- ``state``: the profiles changed and deleted through the API (JSON, as the state folder
  keeps them on a single box), so they survive restarts of every facecast process. Run
  Redis with persistence (``appendonly yes``) for them to survive a restart of Redis too.

Leases use Redis's own expiry (server time), never a comparison of clocks across machines.
Every call has a socket timeout: a store that stops answering raises StoreError, and the
caller decides (a worker keeps its streams and retries; see facecast/serve/worker.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import redis

from facecast.errors import FacecastError
from facecast.serve.profiles import Profile, write_atomic
from facecast.swap.sources import source_photos

log = logging.getLogger(__name__)

PREFIX = "facecast:"
# every call to the store gives up after this long: a stalled store is an error, not a hang
SOCKET_TIMEOUT_S = 2.0

# KEYS[1] = the lease, ARGV = owner, ttl ms. Renewed when it is ours; taken again when it
# is gone (the store restarted without it, or it ran out while the store was away) — the
# owner's stream never stopped, so it keeps the key; 0 when another worker holds it.
_RENEW = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif not owner then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# KEYS[1] = a key, ARGV[1] = the value it must still hold to be deleted
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class StoreError(FacecastError):
    """The coordination store cannot be reached or answered something unusable."""


class ClusterStore:
    """The cluster's view of the store; thread-safe (redis-py pools its connections)."""

    def __init__(self, url: str, prefix: str = PREFIX) -> None:
        try:
            self.redis = redis.Redis.from_url(
                url,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=SOCKET_TIMEOUT_S,
                health_check_interval=10,
            )
        except ValueError as exc:
            raise StoreError(f"store URL {url!r}: {exc}") from None
        self.url = url
        self.prefix = prefix
        self._renew = self.redis.register_script(_RENEW)
        self._delete_if = self.redis.register_script(_DELETE_IF)

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)``, with a store failure turned into one StoreError that says what
        was being done (and never the URL's password)."""
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"store {self.safe_url()}: cannot {what}: {exc}") from None

    def safe_url(self) -> str:
        """The URL without its password, for messages and logs."""
        head, sep, tail = self.url.rpartition("@")
        if not sep:
            return self.url
        scheme, _, _ = head.partition("://")
        return f"{scheme}://***@{tail}"

    def ping(self) -> None:
        self.call("answer a ping", self.redis.ping)

    def close(self) -> None:
        self.redis.close()

    # ------------------------------------------------------------------ the ingest

    def advertise_ingest(self, rtmp_base: str, worker_secret: str) -> None:
        """Where workers read ``live/KEY`` and publish ``swapped/KEY``, and the secret that
        lets them (nginx checks it on both)."""
        value = json.dumps({"rtmp": rtmp_base, "secret": worker_secret})
        self.call("advertise the ingest", self.redis.set, self._k("ingest"), value)

    def ingest(self) -> dict[str, str] | None:
        raw = self.call("read the ingest's address", self.redis.get, self._k("ingest"))
        return json.loads(raw) if raw else None

    def refresh_published(self, publishers: dict[str, str], ttl_s: float) -> None:
        """Every key published now (key -> nginx client id), each for ``ttl_s`` more."""
        if not publishers:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key, client in publishers.items():
            pipe.set(self._k("published", key), client, px=int(ttl_s * 1000))
        self.call("refresh the published keys", pipe.execute)

    def unpublish(self, key: str, client: str) -> None:
        """``key``'s publisher ``client`` left (a newer publisher's entry is kept)."""
        self.call(
            "unpublish a key", self._delete_if, keys=[self._k("published", key)], args=[client]
        )

    def published(self) -> dict[str, str]:
        """key -> client id of every key being published now."""
        return self._read_all("published", "read the published keys")

    def _read_all(self, kind: str, what: str) -> dict[str, str]:
        def read() -> dict[str, str]:
            names = list(self.redis.scan_iter(match=self._k(kind, "*"), count=500))
            values = self.redis.mget(names) if names else []
            start = len(self._k(kind, ""))
            return {
                name.decode()[start:]: value.decode()
                for name, value in zip(names, values, strict=True)
                if value is not None  # expired between the scan and the read
            }

        return self.call(what, read)

    # ------------------------------------------------------------------ leases

    def claim(self, key: str, worker: str, ttl_s: float) -> bool:
        """Take ``key`` for ``worker`` if nobody holds it."""
        name = self._k("lease", key)
        return bool(
            self.call("claim a key", self.redis.set, name, worker, nx=True, px=int(ttl_s * 1000))
        )

    def renew(self, keys: list[str], worker: str, ttl_s: float) -> dict[str, bool]:
        """Per key: is it still ``worker``'s (renewed for ``ttl_s``)? One round trip."""
        if not keys:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            self._renew(keys=[self._k("lease", key)], args=[worker, int(ttl_s * 1000)], client=pipe)
        answers = self.call("renew the leases", pipe.execute)
        return {key: bool(answer) for key, answer in zip(keys, answers, strict=True)}

    def release(self, key: str, worker: str) -> None:
        """Give ``key`` up, if ``worker`` still holds it."""
        self.call("release a key", self._delete_if, keys=[self._k("lease", key)], args=[worker])

    def owners(self) -> dict[str, str]:
        """key -> worker, for every key some worker holds."""
        return self._read_all("lease", "read the leases")

    # ------------------------------------------------------------------ workers

    def heartbeat(self, worker: str, info: dict[str, Any], ttl_s: float) -> None:
        value = json.dumps(info)
        name = self._k("worker", worker)
        self.call("write a heartbeat", self.redis.set, name, value, px=int(ttl_s * 1000))

    def forget_worker(self, worker: str) -> None:
        self.call("remove a heartbeat", self.redis.delete, self._k("worker", worker))

    def workers(self) -> dict[str, dict[str, Any]]:
        """worker id -> its last heartbeat, for every worker alive."""
        raw = self._read_all("worker", "read the workers")
        return {worker: json.loads(value) for worker, value in raw.items()}

    # ------------------------------------------------------------------ profiles and images

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its SHA-256 (once: the same photo is never stored twice)."""
        digest = hashlib.sha256(data).hexdigest()
        self.call("store an image", self.redis.set, self._k("blob", digest), data, nx=True)
        return digest

    def get_blob(self, digest: str) -> bytes:
        data = self.call("read an image", self.redis.get, self._k("blob", digest))
        if data is None:
            raise StoreError(f"store {self.safe_url()}: image {digest[:12]} is missing")
        return bytes(data)

    def set_profiles(self, entries: dict[str, dict[str, Any]]) -> None:
        """Replace the profiles in force with ``entries`` (key -> JSON-ready entry), at once."""
        name = self._k("profiles")
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(name)
        if entries:
            pipe.hset(name, mapping={k: json.dumps(v) for k, v in entries.items()})
        self.call("write the profiles", pipe.execute)

    def set_profile(self, key: str, entry: dict[str, Any] | None) -> None:
        name = self._k("profiles")
        if entry is None:
            self.call("delete a profile", self.redis.hdel, name, key)
        else:
            self.call("write a profile", self.redis.hset, name, key, json.dumps(entry))

    def profile(self, key: str) -> dict[str, Any] | None:
        raw = self.call("read a profile", self.redis.hget, self._k("profiles"), key)
        return json.loads(raw) if raw else None

    def save_state(self, state: dict[str, Any]) -> None:
        self.call("save the API's changes", self.redis.set, self._k("state"), json.dumps(state))

    def state(self) -> dict[str, Any] | None:
        raw = self.call("read the API's changes", self.redis.get, self._k("state"))
        return json.loads(raw) if raw else None


def _file_ref(store: ClusterStore, path: Path) -> str:
    """A local image as ``SHA256.suffix``, its bytes stored."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"{path}: cannot read it to share it with the workers ({exc})") from None
    return store.put_blob(data) + path.suffix.lower()


def profile_entry(store: ClusterStore, profile: Profile) -> dict[str, Any]:
    """``profile`` as the store keeps it: JSON, every photo by content hash, its bytes
    stored, so a worker on another machine can rebuild it (see ``entry_profile``)."""
    return {
        "source": [_file_ref(store, p) for p in source_photos([profile.source])],
        "faces": profile.faces,
        "blend": profile.blend,
        "references": [
            [_file_ref(store, photo), _file_ref(store, face) if face else None]
            for photo, face in profile.references
        ],
        "models": [list(pair) for pair in profile.models],
    }


def entry_profile(store: ClusterStore, entry: dict[str, Any], cache: Path) -> Profile:
    """The profile an entry describes, its photos written to ``cache`` (once each). Several
    source photos become a folder of them, as a profile's source folder is read."""

    def local(ref: str) -> Path:
        digest, dot, suffix = ref.partition(".")
        return materialise(store, digest, dot + suffix, cache)

    photos = [local(ref) for ref in entry["source"]]
    if len(photos) == 1:
        source = photos[0]
    else:
        source = cache / ("set-" + hashlib.sha256("".join(entry["source"]).encode()).hexdigest())
        if not source.is_dir():
            source.mkdir(parents=True, exist_ok=True)
            for n, photo in enumerate(photos):
                target = source / f"{n:03d}{photo.suffix}"
                if not target.exists():
                    target.symlink_to(photo)
    return Profile(
        source,
        entry.get("faces", "all"),
        entry.get("blend", "feather"),
        tuple((local(photo), local(face) if face else None) for photo, face in entry["references"]),
        tuple((str(k), str(v)) for k, v in entry.get("models", [])),
    )


def materialise(store: ClusterStore, digest: str, suffix: str, folder: Path) -> Path:
    """The image ``digest`` as a local file in ``folder`` (a cache: written once)."""
    path = folder / f"{digest}{suffix}"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, store.get_blob(digest))
    return path


class StoreProfileState:
    """The profiles changed and deleted through the API, kept in the store: what the state
    folder (``profiles.ProfileState``) is on a single box, with the same methods, so the
    ingest's control plane keeps them the same way. ``folder``: a local scratch folder for
    uploads (``faces``) and the photos read back from the store (``cache``)."""

    def __init__(self, store: ClusterStore, folder: Path) -> None:
        self.store = store
        self.faces = folder / "faces"
        self.cache = folder / "cache"
        for path in (self.faces, self.cache):
            path.mkdir(parents=True, exist_ok=True)

    def load(self) -> tuple[dict[str, Profile], set[str]]:
        state = self.store.state() or {}
        changed = {
            key: entry_profile(self.store, entry, self.cache)
            for key, entry in (state.get("changed") or {}).items()
        }
        return changed, set(state.get("deleted") or [])

    def save(self, profiles: dict[str, Profile], deleted: set[str]) -> None:
        changed = {key: profile_entry(self.store, p) for key, p in sorted(profiles.items())}
        self.store.save_state({"changed": changed, "deleted": sorted(deleted)})

    def prune_faces(self, profiles: dict[str, Profile]) -> None:
        """Nothing to prune: images are stored by content, and a worker starting a stream
        may be reading any of them."""


def store_problems(store: ClusterStore) -> list[str]:
    """Readiness: why the store is not usable now (empty when it is)."""
    try:
        store.ping()
    except StoreError as exc:
        return [str(exc)]
    return []


def cluster_view(store: ClusterStore) -> dict[str, Any]:
    """Published keys, who runs each, and the workers alive (``GET /api/cluster``)."""
    published, owners = store.published(), store.owners()
    return {
        "published": sorted(published),
        "owners": {key: owners[key] for key in sorted(owners)},
        "waiting": sorted(set(published) - set(owners)),
        "workers": store.workers(),
    }
