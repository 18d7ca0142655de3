"""The log replica's state: applying log records, and snapshots of the state.

Everything here is synchronous and does no I/O: :class:`ReplicaState` is the in-memory swarm
(:class:`tracker.swarm.MemorySwarm`) plus what a replica of :mod:`tracker.swarm_log` needs on
top: applying a batch of log records in order, and capturing or restoring a snapshot. The
record and snapshot formats are defined here, next to the code that reads them.

A log record is an announce packed binary (``a`` then :data:`_ANN`: fixed fields, then the
address, app and record bundle), or any other change as ``j``, a length and a JSON list
(``r`` report, ``c`` an operator's ``clear_peer``, ``g`` gc, and ``a`` for announces of the
previous, all-JSON log format). A snapshot is zlib-compressed JSON followed by the replay
digests as a fixed-width binary table (most of a snapshot's size under load).
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

from .backend import AnnounceCommit, ReportCommit
from .core import EVENTS, Announce, PeerReport, Report
from .errors import LogFormatError
from .quality import PeerQuality
from .swarm import MemorySwarm
from .swarm_members import Member

__all__ = [
    "ReplicaState",
    "encode_announce",
    "json_record",
    "pack_snapshot",
    "unpack_snapshot",
]

_MAGIC = b"p2pnode-tracker-snapshot-1\n"
#: A packed announce: now, ttl, replay digest, window, public key, node id, manifest, port,
#: event (index in core.EVENTS), size, left, from_peers, from_cdn, uploaded, then the lengths
#: of the address, the app name and the record bundle that follow it.
_ANN = struct.Struct(">dd16sd32s20s32sHBQQQQQBBH")
_EVENT_INDEX = {e: i for i, e in enumerate(EVENTS)}
_JSON_LEN = struct.Struct(">I")
_SEEN = struct.Struct(">16sd")


def encode_announce(c: AnnounceCommit) -> bytes:
    """An announce as a log record: ``a``, the packed fixed fields (``_ANN``), then the
    address, the app name and the record bundle."""
    a, ip, record = c.announce, c.ip, c.record
    ip_b, app_b, rec = ip.encode(), a.app.encode(), record or b""
    return b"".join(
        (
            b"a",
            _ANN.pack(
                c.now,
                c.ttl,
                c.digest,
                c.window,
                a.public_key,
                a.node_id,
                a.manifest,
                a.port,
                _EVENT_INDEX[a.event],
                a.size,
                a.left,
                a.from_peers,
                a.from_cdn,
                a.uploaded,
                len(ip_b),
                len(app_b),
                len(rec),
            ),
            ip_b,
            app_b,
            rec,
        )
    )


def json_record(change: list[Any]) -> bytes:
    """A change other than an announce, as a log record: ``j``, length, JSON list."""
    body = json.dumps(change, separators=(",", ":")).encode()
    return b"j" + _JSON_LEN.pack(len(body)) + body


class ReplicaState(MemorySwarm):
    """The swarm state of one log replica (see the module docstring)."""

    def apply_records(self, data: bytes, numwants: list[int], where: str) -> list[Any]:
        """Apply the records of one batch in order (``numwants``: one per record; ``where``
        names the log in errors); their results.

        Raises:
            LogFormatError: the batch is malformed (what came before it stays applied).
        """
        try:
            return self._apply_packed(data, numwants, where)
        except (struct.error, UnicodeDecodeError, IndexError) as exc:
            raise LogFormatError(f"a batch in the log {where} is malformed: {exc}") from exc

    def _apply_packed(self, data: bytes, numwants: list[int], where: str) -> list[Any]:
        out = []
        at = 0
        for numwant in numwants:
            kind = data[at : at + 1]
            at += 1
            if kind == b"a":
                f = _ANN.unpack_from(data, at)
                now, ttl, digest, window, pk, node, mid, port, event = f[:9]
                size, left, fp, fc, up, n_ip, n_app, n_rec = f[9:]
                at += _ANN.size
                ip = data[at : at + n_ip].decode()
                at += n_ip
                app = data[at : at + n_app].decode()
                at += n_app
                record = data[at : at + n_rec] if n_rec else None
                at += n_rec
                a = Announce(
                    pk, node, 0, app, mid, None, port, EVENTS[event], size, left, fp, fc, up,
                    numwant, (),
                )  # fmt: skip
                out.append(self.announce(AnnounceCommit(a, ip, record, now, ttl, digest, window)))
            elif kind == b"j":
                (n,) = _JSON_LEN.unpack_from(data, at)
                at += _JSON_LEN.size
                out.append(self.apply_json(json.loads(data[at : at + n]), numwant, where))
                at += n
            else:
                raise LogFormatError(f"unknown record kind {kind!r} in the log {where}")
        if at != len(data):
            raise LogFormatError(f"a batch in the log {where} has trailing bytes")
        return out

    def apply_json(self, e: list[Any], numwant: int, where: str) -> Any:
        """Apply one change written as a JSON list (anything but an announce; announces of
        the previous log format too); its result."""
        kind = e[0]
        if kind == "a":
            (_, now, ttl, digest, window, ip, record, pk, node, app, mid) = e[:11]
            port, event, size, left, fp, fc, up = e[11:]
            a = Announce(
                bytes.fromhex(pk),
                bytes.fromhex(node),
                0,
                app,
                bytes.fromhex(mid),
                None,
                port,
                event,
                size,
                left,
                fp,
                fc,
                up,
                numwant,
                (),
            )
            record_b = bytes.fromhex(record) if record else None
            return self.announce(
                AnnounceCommit(a, ip, record_b, now, ttl, bytes.fromhex(digest), window)
            )
        if kind == "r":
            _, now, digest, window, reporter, peers = e
            r = Report(
                b"",
                bytes.fromhex(reporter),
                0,
                tuple(PeerReport(bytes.fromhex(p[0]), *p[1:]) for p in peers),
            )
            return self.report(ReportCommit(r, now, bytes.fromhex(digest), window))
        if kind == "c":
            return self.clear_peer(bytes.fromhex(e[1]))
        if kind == "g":
            return self.gc(e[1])
        raise LogFormatError(f"unknown entry kind {kind!r} in the log {where}")

    def capture(self, applied: str) -> dict[str, Any]:
        """The state, which is the log's up to stream id ``applied``, as plain values (cheap
        copies; :func:`pack_snapshot` packs them)."""
        return {
            "id": applied,
            "members": [
                [sw.manifest.hex(), sw.app, [m.row()[1:] for m in sw.members.values()]]
                for sw in self._swarms.values()
            ],
            "builds": {app: dict(b) for app, b in self._builds.items()},
            "releases": [[mid, *rel] for mid, rel in self._releases.items()],
            "adoption": list(self._adoption.items()),
            "done": [[mid, self._done_at[mid], list(nodes)] for mid, nodes in self._done.items()],
            "quality": [
                [n, q.mib, q.failures, q.corrupt, q.rate, q.reports, q.corrupt_reporters]
                for n, q in self._quality.items()
            ],
            "corrupt_by": [[n, list(s)] for n, s in self._corrupt_by.items()],
            "seen": list(self._seen.items()),
        }

    @classmethod
    def from_snapshot(cls, s: dict[str, Any]) -> ReplicaState:
        """The state a snapshot (:func:`unpack_snapshot`) holds; its stream id is ``s["id"]``."""
        self = cls()
        for mid_hex, app, rows in s["members"]:
            mid = bytes.fromhex(mid_hex)
            for node, _app, key, ip, port, size, left, fp, fc, up, expires, record in rows:
                m = Member(
                    mid,
                    bytes.fromhex(node),
                    app,
                    bytes.fromhex(key),
                    ip,
                    port,
                    size,
                    left,
                    fp,
                    fc,
                    up,
                    expires,
                    bytes.fromhex(record) if record is not None else None,
                )
                self.apply_member(m, 0.0)
        self._builds = {
            app: {bytes.fromhex(m): t for m, t in b.items()} for app, b in s["builds"].items()
        }
        for mid, app, *counters in s["releases"]:
            self.set_release(bytes.fromhex(mid), app, counters)
        for mid, minute, n in s["adoption"]:
            self.set_adoption(bytes.fromhex(mid), minute, n)
        for mid, at, nodes in s.get("done", ()):  # snapshots before it have none
            for node in nodes:
                self.restore_completion(bytes.fromhex(mid), bytes.fromhex(node), at)
        reporters = {bytes.fromhex(n): [bytes.fromhex(r) for r in rs] for n, rs in s["corrupt_by"]}
        for n, *q in s["quality"]:
            node = bytes.fromhex(n)
            self.set_quality(node, PeerQuality(*q), reporters.get(node, ()))
        self.restore_seen(s["seen"])
        return self


def pack_snapshot(state: dict[str, Any]) -> bytes:
    """Serialise :meth:`ReplicaState.capture`'s output: compressed JSON, then the replay digests
    as a fixed-width binary table (most of a snapshot's size under load)."""

    def hexed(v: Any) -> Any:
        return v.hex() if isinstance(v, bytes) else v

    doc = dict(state)
    seen = doc.pop("seen")
    doc["members"] = [
        [mid, app, [[hexed(v) for v in row] for row in rows]] for mid, app, rows in doc["members"]
    ]
    doc["builds"] = {app: {m.hex(): t for m, t in b.items()} for app, b in doc["builds"].items()}
    doc["releases"] = [[mid.hex(), *rest] for mid, *rest in doc["releases"]]
    doc["adoption"] = [[mid.hex(), minute, n] for (mid, minute), n in doc["adoption"]]
    doc["done"] = [[mid.hex(), at, [n.hex() for n in nodes]] for mid, at, nodes in doc["done"]]
    doc["quality"] = [[n.hex(), *rest] for n, *rest in doc["quality"]]
    doc["corrupt_by"] = [[n.hex(), [r.hex() for r in rs]] for n, rs in doc["corrupt_by"]]
    head = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 1)
    table = b"".join(_SEEN.pack(d, exp) for d, exp in seen)
    return _MAGIC + struct.pack(">Q", len(head)) + head + table


def unpack_snapshot(blob: bytes) -> dict[str, Any]:
    """The inverse of :func:`pack_snapshot` (hex strings stay hex; ``seen`` is bytes)."""
    if not blob.startswith(_MAGIC):
        raise LogFormatError("the snapshot does not start with this version's header")
    at = len(_MAGIC)
    (n,) = struct.unpack_from(">Q", blob, at)
    at += 8
    doc: dict[str, Any] = json.loads(zlib.decompress(blob[at : at + n]))
    at += n
    doc["seen"] = [(bytes(d), exp) for d, exp in _SEEN.iter_unpack(memoryview(blob)[at:])]
    return doc
