"""What a node learns of an app's key rotations on its feed polls, and keeps (node/rotations.py):
no tracker process here, the chain comes from a mirror folder."""

from __future__ import annotations

import json
from pathlib import Path

from p2pnode.disk.state import StateDir
from p2pnode.node.rotations import KEYCHAIN_FILE, InstallKeys, held_rotations, learn_chain
from p2pnode.release import keys
from tests.support.release import mirror_chain, pinned_install, rotation

NOWHERE = "http://127.0.0.1:9"  # a tracker that does not answer: the mirror does


async def test_a_named_chain_is_read_once_followed_from_the_pin_and_kept(tmp_path: Path) -> None:
    k0, k1, k2 = keys.generate_key(), keys.generate_key(), keys.generate_key()
    dest, mirror = pinned_install(tmp_path, k0)
    chain = mirror_chain(mirror, rotation(k0, k1, 100))
    assert await learn_chain(dest, "game", chain, NOWHERE) == 1
    kept = json.loads((dest.parent / ".game.p2pnode" / KEYCHAIN_FILE).read_text())
    assert kept["key_chain"] == chain and len(kept["rotations"]) == 1
    assert await learn_chain(dest, "game", chain, NOWHERE) == 0  # read already: not fetched
    sd = StateDir(dest)
    ring = InstallKeys(sd, "game").ring()  # what the swarm checks pushes against
    assert ring.until[keys.public_key_bytes(k0)] == 100 and keys.public_key_bytes(k1) in ring

    longer = mirror_chain(mirror, rotation(k0, k1, 100), rotation(k1, k2, 100))
    assert await learn_chain(dest, "game", longer, NOWHERE) == 1
    assert len(held_rotations(sd, sd.load())) == 2


async def test_a_forged_or_stale_chain_teaches_nothing_and_is_asked_again(tmp_path: Path) -> None:
    k0, k1 = keys.generate_key(), keys.generate_key()
    dest, mirror = pinned_install(tmp_path, k0)
    forged = mirror_chain(mirror, rotation(k0, k1, 100, signer=k1))
    assert await learn_chain(dest, "game", forged, NOWHERE) == 0
    sd = StateDir(dest)
    assert held_rotations(sd, sd.load()) == []
    # the feed names a chain the mirror does not hold yet: nothing is recorded as read
    mirror_chain(mirror)
    assert await learn_chain(dest, "game", "0" * 32, NOWHERE) == 0
    kept = json.loads((sd.root / KEYCHAIN_FILE).read_text())
    assert kept["key_chain"] == forged  # (the forged document was read: nothing in it)
