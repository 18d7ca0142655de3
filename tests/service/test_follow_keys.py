"""A daemon's follower learns an app's key rotation from its feed's answers (service/follow.py,
node/rotations.py): without a new-key build, the entry's install then refuses the old key's
builds after the rotation's date. The chain comes from the install's mirror folder here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2pnode.discovery.tracker_api import ChannelHead
from p2pnode.disk.state import StateDir
from p2pnode.errors import SignatureError
from p2pnode.node.rotations import InstallKeys
from p2pnode.release import keys
from p2pnode.release import manifest as M
from p2pnode.service.follow import _key_chain
from p2pnode.service.library import Entry
from tests.support.release import mirror_chain, pinned_install, rotation, small_manifest


async def test_a_follower_learns_the_chain_its_feed_names(tmp_path: Path) -> None:
    k0, k1 = keys.generate_key(), keys.generate_key()
    dest, mirror = pinned_install(tmp_path, k0)
    until = 2_000_000_000
    chain = mirror_chain(mirror, rotation(k0, k1, until))
    pub = keys.format_public_key(keys.public_key_bytes(k0))
    entry = Entry("e1", "game", str(dest), (pub,), tracker="http://127.0.0.1:9")
    head = ChannelHead("game", "stable", 1, bytes(32), 1, "1", key_chain=chain)
    events: list[dict[str, Any]] = []
    await _key_chain(entry, events.append, head)
    await _key_chain(entry, events.append, head)  # read already: said once
    assert events == [{"event": "key-rotation", "entry": "e1", "learnt": 1}]

    ring = InstallKeys(StateDir(dest), "game").ring()
    old = M.sign(small_manifest(key=keys.public_key_bytes(k0), expires=until + 86400), k0)
    ring.verify(old, now=until - 1)
    with pytest.raises(SignatureError, match="retired"):
        ring.verify(old, now=until + 1)
