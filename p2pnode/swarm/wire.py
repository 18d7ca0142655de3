"""The peer wire protocol, version 1: frames and messages, sans-IO.

Theory of operation
-------------------
Two peers talk over one TLS 1.3 stream (mutually authenticated; see docs/protocol.md). The
stream carries *frames*::

    frame   = length:u32be  header_length:u16be  header  payload
    length  = 2 + header_length + len(payload)          (bytes after the length field)
    header  = canonical bencode dict, key "t" names the message type
    payload = raw bytes (a bitfield, or a chunk's bytes), never bencoded

Chunk payloads stay raw so a 4 MiB chunk costs no bencode encoding or parsing, and the decoder
hands them out as a ``memoryview`` of the receive buffer's bytes (no copy) for hashing and
writing. Every size and count has a hard limit (named constants below); anything that breaks a
rule raises :class:`~p2pnode.errors.RemoteProtocolError`, nothing else does (the fuzz tests
hold the decoder to that). Unknown message types decode to :class:`Unknown` and are ignored by
the peer state machine, so later versions can add messages.

As in h11, the decoder only buffers bytes and returns events; the encoder returns bytes. No
sockets here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import zstandard

from ..errors import LocalProtocolError, ManifestError, RemoteProtocolError
from ..release import canonical

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "Bitfield",
    "Cancel",
    "Choke",
    "Event",
    "FrameDecoder",
    "Goodbye",
    "Have",
    "Hello",
    "Join",
    "Keepalive",
    "ManifestPush",
    "Piece",
    "Reject",
    "Request",
    "Unchoke",
    "Unknown",
    "encode",
]

PROTOCOL_VERSION = 1
#: Largest chunk the manifest format allows (manifest.MAX_CHUNK_BYTES).
MAX_CHUNK_BYTES = 16 * 1024 * 1024
#: A bitfield for the largest manifest (1M files could hold ~16M chunks; 2 MiB covers 16M).
MAX_BITFIELD_BYTES = 2 * 1024 * 1024
MAX_HEADER_BYTES = 4096
MAX_FRAME_BYTES = 2 + MAX_HEADER_BYTES + MAX_CHUNK_BYTES
#: A signed manifest pushed to a peer (a 16 MiB manifest lists ~450k chunks: ~450 GiB).
MAX_PUSHED_MANIFEST_BYTES = MAX_CHUNK_BYTES
MAX_CAPABILITIES = 32
MAX_TEXT_BYTES = 256
_LEN = struct.Struct(">IH")


class Event:
    """Base of every message; subclasses are frozen, slotted and checked when built."""

    type: ClassVar[bytes] = b""

    def header(self) -> dict[bytes, Any]:
        raise NotImplementedError

    def payload(self) -> bytes | memoryview:
        return b""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise LocalProtocolError(f"invalid message: {what}")


def _is_id(value: object, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def _is_index(value: object) -> bool:
    return type(value) is int and 0 <= value < (1 << 32)


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """First message each way: who I am and what I speak."""

    type: ClassVar[bytes] = b"hello"
    node_id: bytes
    listen_port: int
    version: int = PROTOCOL_VERSION
    capabilities: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check(_is_id(self.node_id, 20), "node id must be 20 bytes")
        _check(type(self.listen_port) is int and 0 <= self.listen_port < 65536, "port")
        _check(type(self.version) is int and 0 < self.version < 1000, "version")
        _check(len(self.capabilities) <= MAX_CAPABILITIES, "too many capabilities")
        _check(
            all(isinstance(c, bytes) and 0 < len(c) <= 32 for c in self.capabilities),
            "capability names are 1..32 bytes",
        )

    def header(self) -> dict[bytes, Any]:
        return {
            b"t": self.type,
            b"v": self.version,
            b"id": self.node_id,
            b"port": self.listen_port,
            b"caps": list(self.capabilities),
        }


@dataclass(frozen=True, slots=True)
class Join(Event):
    """I want chunks of (or can serve chunks to) the swarm of this manifest."""

    type: ClassVar[bytes] = b"join"
    manifest: bytes

    def __post_init__(self) -> None:
        _check(_is_id(self.manifest, 32), "manifest id must be 32 bytes")

    def header(self) -> dict[bytes, Any]:
        return {b"t": self.type, b"m": self.manifest}


@dataclass(frozen=True, slots=True)
class Bitfield(Event):
    """Which of the manifest's unique chunks (first-seen order) I hold: bit 7 of byte 0 is
    chunk 0. Sent after Join, by each side, for the manifest joined."""

    type: ClassVar[bytes] = b"bitfield"
    manifest: bytes
    count: int
    bits: bytes | memoryview

    def __post_init__(self) -> None:
        _check(_is_id(self.manifest, 32), "manifest id must be 32 bytes")
        _check(type(self.count) is int and 0 <= self.count <= MAX_BITFIELD_BYTES * 8, "count")
        _check(len(self.bits) == (self.count + 7) // 8, "bitfield length does not match count")
        spare = (8 - self.count % 8) % 8
        _check(not spare or (self.bits[-1] & ((1 << spare) - 1)) == 0, "spare bits must be 0")

    def header(self) -> dict[bytes, Any]:
        return {b"t": self.type, b"m": self.manifest, b"n": self.count}

    def payload(self) -> bytes | memoryview:
        return self.bits

    def has(self, index: int) -> bool:
        return 0 <= index < self.count and bool(self.bits[index >> 3] & (0x80 >> (index & 7)))


@dataclass(frozen=True, slots=True)
class Have(Event):
    type: ClassVar[bytes] = b"have"
    manifest: bytes
    index: int

    def __post_init__(self) -> None:
        _check(_is_id(self.manifest, 32) and _is_index(self.index), "have")

    def header(self) -> dict[bytes, Any]:
        return {b"t": self.type, b"m": self.manifest, b"i": self.index}


@dataclass(frozen=True, slots=True)
class _ChunkRequestRef(Event):
    """Fields shared by a request and what refers to it: which chunk, and the request id."""

    manifest: bytes
    index: int
    rid: int

    def __post_init__(self) -> None:
        _check(
            _is_id(self.manifest, 32) and _is_index(self.index) and _is_index(self.rid),
            self.type.decode(),
        )

    def header(self) -> dict[bytes, Any]:
        return {b"t": self.type, b"m": self.manifest, b"i": self.index, b"r": self.rid}


@dataclass(frozen=True, slots=True)
class Request(_ChunkRequestRef):
    """Send me chunk ``index``; ``rid`` names this request in the Piece/Reject answering it."""

    type: ClassVar[bytes] = b"req"


@dataclass(frozen=True, slots=True)
class Cancel(_ChunkRequestRef):
    """I no longer want request ``rid``."""

    type: ClassVar[bytes] = b"cancel"


@dataclass(frozen=True, slots=True)
class Reject(Event):
    """I will not send that chunk (choked, do not have it, overloaded)."""

    type: ClassVar[bytes] = b"reject"
    manifest: bytes
    index: int
    rid: int
    reason: bytes = b""

    def __post_init__(self) -> None:
        _check(
            _is_id(self.manifest, 32) and _is_index(self.index) and _is_index(self.rid), "reject"
        )
        _check(isinstance(self.reason, bytes) and len(self.reason) <= MAX_TEXT_BYTES, "reason")

    def header(self) -> dict[bytes, Any]:
        return {
            b"t": self.type,
            b"m": self.manifest,
            b"i": self.index,
            b"r": self.rid,
            b"why": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Piece(Event):
    """A chunk's bytes. ``chunk_id`` travels with it so the receiver checks blake3 against the
    id it asked for before anything is written; ``data`` is always the *uncompressed* chunk
    (the codec compresses on the wire when that pays)."""

    type: ClassVar[bytes] = b"piece"
    manifest: bytes
    index: int
    rid: int
    chunk_id: bytes
    data: bytes | memoryview

    def __post_init__(self) -> None:
        _check(_is_id(self.manifest, 32) and _is_index(self.index) and _is_index(self.rid), "piece")
        _check(_is_id(self.chunk_id, 32), "chunk id must be 32 bytes")
        _check(0 < len(self.data) <= MAX_CHUNK_BYTES, "chunk size")

    def header(self) -> dict[bytes, Any]:
        return {
            b"t": self.type,
            b"m": self.manifest,
            b"i": self.index,
            b"r": self.rid,
            b"c": self.chunk_id,
            b"n": len(self.data),
            b"z": 0,
        }

    def payload(self) -> bytes | memoryview:
        return self.data


@dataclass(frozen=True, slots=True)
class ManifestPush(Event):
    """Here is the signed manifest ``manifest`` (the payload), which you said you do not know:
    if its publisher is one you already trust for that app, join its swarm as a partial seed.
    Sent only to peers whose hello lists the ``manifest`` capability; answered by a bitfield
    (count 0 when refused)."""

    type: ClassVar[bytes] = b"manifest"
    manifest: bytes
    signed: bytes | memoryview

    def __post_init__(self) -> None:
        _check(_is_id(self.manifest, 32), "manifest id must be 32 bytes")
        _check(0 < len(self.signed) <= MAX_PUSHED_MANIFEST_BYTES, "pushed manifest size")

    def header(self) -> dict[bytes, Any]:
        return {b"t": self.type, b"m": self.manifest}

    def payload(self) -> bytes | memoryview:
        return self.signed


@dataclass(frozen=True, slots=True)
class Choke(Event):
    type: ClassVar[bytes] = b"choke"

    def header(self) -> dict[bytes, Any]:
        return {b"t": self.type}


@dataclass(frozen=True, slots=True)
class Unchoke(Event):
    type: ClassVar[bytes] = b"unchoke"

    def header(self) -> dict[bytes, Any]:
        return {b"t": self.type}


@dataclass(frozen=True, slots=True)
class Keepalive(Event):
    type: ClassVar[bytes] = b"ka"

    def header(self) -> dict[bytes, Any]:
        return {b"t": self.type}


@dataclass(frozen=True, slots=True)
class Goodbye(Event):
    type: ClassVar[bytes] = b"bye"
    reason: bytes = b""

    def __post_init__(self) -> None:
        _check(isinstance(self.reason, bytes) and len(self.reason) <= MAX_TEXT_BYTES, "reason")

    def header(self) -> dict[bytes, Any]:
        return {b"t": self.type, b"why": self.reason}


@dataclass(frozen=True, slots=True)
class Unknown(Event):
    """A message type this version does not know; to be ignored."""

    name: bytes


# -- encoding ---------------------------------------------------------------------------------

#: Compress a piece only when zstd saves at least this fraction (game assets are often
#: compressed already; trying costs ~0.1 ms per MiB at level 1, measured 8.9 GB/s here).
COMPRESS_MIN_SAVING = 0.10
_ZSTD_LEVEL = 1
#: The smallest zstd window (2^10, the format's minimum window log): the window bound of a
#: compressed piece of ``n`` bytes is ``n`` rounded up to a power of two, at least this.
MIN_ZSTD_WINDOW = 1 << 10


def encode(event: Event, *, compress: bool = True) -> list[bytes | memoryview]:
    """The frame for ``event`` as buffers to write in order (a chunk's bytes are passed
    through, not copied, unless compressed)."""
    header = event.header()
    payload = event.payload()
    if isinstance(event, Piece) and compress and len(payload) >= 4096:
        packed = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(payload)
        if len(packed) <= len(payload) * (1 - COMPRESS_MIN_SAVING):
            header[b"z"] = 1
            payload = packed
    head = canonical.encode(header)
    if len(head) > MAX_HEADER_BYTES:
        raise LocalProtocolError("message header too large")
    return [_LEN.pack(2 + len(head) + len(payload), len(head)), head, payload]


def encode_bytes(event: Event, *, compress: bool = True) -> bytes:
    return b"".join(encode(event, compress=compress))


# -- decoding ---------------------------------------------------------------------------------


class FrameDecoder:
    """Bytes in, events out. ``feed(b"")`` means the peer closed the stream.

    Memory is bounded by one frame (``MAX_FRAME_BYTES``) plus what the caller feeds at once.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise RemoteProtocolError("data after the end of the stream")
        if not data:
            self._eof = True
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_event(self) -> Event | None:
        """The next complete message, or None if more bytes are needed.

        Raises:
            RemoteProtocolError: the bytes break the protocol, or the stream ended mid-frame.
        """
        buf = self._buf
        if len(buf) < _LEN.size:
            if self._eof and buf:
                raise RemoteProtocolError("stream ended inside a frame")
            return None
        length, head_len = _LEN.unpack_from(buf)
        if length > MAX_FRAME_BYTES:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
        if head_len > MAX_HEADER_BYTES or head_len + 2 > length:
            raise RemoteProtocolError("frame header length out of bounds")
        if len(buf) < 4 + length:
            if self._eof:
                raise RemoteProtocolError("stream ended inside a frame")
            return None
        with memoryview(buf) as whole:
            frame = bytes(whole[4 : 4 + length])  # the one copy; the chunk is a view of it
        del buf[: 4 + length]
        view = memoryview(frame)
        head = view[2 : 2 + head_len]
        payload = view[2 + head_len :]
        return _parse(bytes(head), payload)


def _parse(head: bytes, payload: memoryview) -> Event:
    try:
        h = canonical.decode(head, what="message header", max_size=MAX_HEADER_BYTES)
    except ManifestError as exc:
        raise RemoteProtocolError(f"bad message header: {exc.message}") from exc
    if not isinstance(h, dict) or not isinstance(h.get(b"t"), bytes):
        raise RemoteProtocolError("message header is not a dict with a type")
    kind = h[b"t"]
    try:
        return _BUILD[kind](h, payload) if kind in _BUILD else Unknown(kind[:32])
    except LocalProtocolError as exc:  # a value check in an event's constructor
        raise RemoteProtocolError(exc.message.replace("invalid message", "bad message")) from exc
    except (KeyError, TypeError) as exc:
        raise RemoteProtocolError(f"bad {kind[:16]!r} message: missing or mistyped field") from exc


def _no_payload(payload: memoryview) -> None:
    if len(payload):
        raise RemoteProtocolError("unexpected payload")


def _piece(h: dict[bytes, Any], payload: memoryview) -> Piece:
    size = h[b"n"]
    if type(size) is not int or not 0 < size <= MAX_CHUNK_BYTES:
        raise RemoteProtocolError("piece size out of bounds")
    z = h.get(b"z", 0)
    if z == 1:
        data: bytes | memoryview = _decompress(payload, size)
    elif z == 0:
        data = payload
    else:
        raise RemoteProtocolError("unknown piece encoding")
    if len(data) != size:
        raise RemoteProtocolError("piece size does not match its header")
    return Piece(h[b"m"], h[b"i"], h[b"r"], h[b"c"], data)


def _decompress(payload: memoryview, size: int) -> bytes:
    """A compressed piece's ``size`` bytes, using about ``size`` bytes of memory whatever the
    frame says: zstandard sizes its output buffer by the content size a frame *declares* and
    ignores ``max_output_size`` then, so a few KiB declaring gigabytes would be allocated
    before any check. Hence: the frame must declare exactly ``size`` (it is then decoded in
    one pass into a buffer of that size), its window may not exceed ``size`` (rounded up to a
    power of two, at least 1 KiB) in case it is decoded in streaming mode, and it must be one
    frame with nothing after it."""
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"piece does not decompress: {exc}") from exc
    if declared != size:
        said = "no size" if declared < 0 else f"{declared} bytes"  # (-1: not declared)
        raise RemoteProtocolError(
            f"a compressed piece's zstd frame must declare its size n = {size}; it declares {said}"
        )
    window = max(MIN_ZSTD_WINDOW, 1 << (size - 1).bit_length())
    try:
        return zstandard.ZstdDecompressor(max_window_size=window).decompress(
            payload, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(f"piece does not decompress: {exc}") from exc


def _hello(h: dict[bytes, Any], payload: memoryview) -> Hello:
    _no_payload(payload)
    caps = h.get(b"caps", [])
    if not isinstance(caps, list):
        raise RemoteProtocolError("capabilities must be a list")
    return Hello(h[b"id"], h[b"port"], h[b"v"], tuple(caps))


def _bitfield(h: dict[bytes, Any], payload: memoryview) -> Bitfield:
    return Bitfield(h[b"m"], h[b"n"], bytes(payload))


def _manifest_push(h: dict[bytes, Any], payload: memoryview) -> ManifestPush:
    return ManifestPush(h[b"m"], bytes(payload))


def _simple(cls: type[Event], *fields: bytes) -> Any:
    def build(h: dict[bytes, Any], payload: memoryview) -> Event:
        _no_payload(payload)
        return cls(*(h[f] for f in fields))

    return build


_BUILD: dict[bytes, Any] = {
    b"hello": _hello,
    b"join": _simple(Join, b"m"),
    b"bitfield": _bitfield,
    b"have": _simple(Have, b"m", b"i"),
    b"req": _simple(Request, b"m", b"i", b"r"),
    b"cancel": _simple(Cancel, b"m", b"i", b"r"),
    b"reject": _simple(Reject, b"m", b"i", b"r", b"why"),
    b"piece": _piece,
    b"manifest": _manifest_push,
    b"choke": _simple(Choke),
    b"unchoke": _simple(Unchoke),
    b"ka": _simple(Keepalive),
    b"bye": _simple(Goodbye, b"why"),
}
