"""Announce sessions: tokens that spare the tracker a signature check per announce."""

from __future__ import annotations

import hmac

import blake3

__all__ = ["SESSION_TTL", "AnnounceSessions"]


#: Seconds an announce session token vouches for a node (its signature is checked this often).
SESSION_TTL = 1800


class AnnounceSessions:
    """Session tokens that spare the tracker an Ed25519 verification per announce.

    Verifying a signature costs ~150 us on the 2-core test machine, most of an announce's CPU.
    A node re-announces every ``interval`` from the same address with the same key, so after
    one verified announce the tracker hands out a token: a MAC over (node id, seen IP, expiry)
    under a key derived from the admin token (replicas share it, so any of them accepts it).
    An announce that carries a valid token for its key and source address skips the signature
    check; it is still signed, and the replay guard still applies. Tokens are not renewed by
    token-vouched announces: every ``ttl`` the node's signature is verified again. This is the
    idea of BitTorrent's UDP tracker connection ids (BEP 15): proof that the source address is
    real and was recently used by the key's owner. Someone who can send from that address and
    reads the token can announce for the node until it expires (statistics only: peers and
    records are still bound to the key's own announces); HTTPS in front of the tracker closes
    even that.
    """

    #: Tokens remembered as checked (a node presents the same token on every announce for
    #: ``ttl``): a dict lookup instead of a MAC per announce. Oldest forgotten first.
    CHECKED_MAX = 65_536

    def __init__(self, secret: str, ttl: int = SESSION_TTL) -> None:
        self._key = blake3.blake3(
            secret.encode(), derive_key_context="p2pnode tracker announce session v1"
        ).digest()
        self.ttl = ttl
        #: token -> (node id, ip, expiry) its MAC was checked for
        self._checked: dict[str, tuple[bytes, str, int]] = {}

    def _mac(self, node_id: bytes, ip: str, expires: int) -> bytes:
        msg = node_id + expires.to_bytes(8, "big") + ip.encode()
        return blake3.blake3(msg, key=self._key).digest()[:16]

    def issue(self, node_id: bytes, ip: str, now: float) -> str:
        expires = int(now) + self.ttl
        return (expires.to_bytes(8, "big") + self._mac(node_id, ip, expires)).hex()

    def valid(self, token: str | None, node_id: bytes, ip: str, now: float) -> bool:
        if not token or len(token) != 48:
            return False
        hit = self._checked.get(token)
        if hit is not None:  # this exact token's MAC was checked for (node id, ip, expiry)
            return hit[0] == node_id and hit[1] == ip and now < hit[2]
        try:
            raw = bytes.fromhex(token)
        except ValueError:
            return False
        expires = int.from_bytes(raw[:8], "big")
        if expires <= now or expires > now + self.ttl:
            return False
        if not hmac.compare_digest(raw[8:], self._mac(node_id, ip, expires)):
            return False
        checked = self._checked
        if len(checked) >= self.CHECKED_MAX:
            del checked[next(iter(checked))]
        checked[token] = (node_id, ip, expires)
        return True
