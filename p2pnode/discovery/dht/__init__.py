"""Peer discovery: signed peer records in a Kademlia DHT, and sources of peers.

See docs/discovery.md for the design and measurements.
"""

from __future__ import annotations

from .records import (
    ExpiredRecordError,
    PeerRecord,
    PeerRecordError,
    RecordSignatureError,
    Topic,
    make_record,
    parse_record,
)
from .storage import RecordStorage

__all__ = [
    "ExpiredRecordError",
    "PeerRecord",
    "PeerRecordError",
    "RecordSignatureError",
    "RecordStorage",
    "Topic",
    "make_record",
    "parse_record",
]
