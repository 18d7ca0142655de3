"""Node identity: a kept key, and mutual TLS 1.3 that proves node ids."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import trio

from p2pnode import identity as I
from p2pnode.errors import UsageError
from p2pnode.release import keys


def test_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    a = I.load_or_create(tmp_path / "id")
    b = I.load_or_create(tmp_path / "id")
    assert a.node_id == b.node_id == keys.node_id_of(a.public_key)
    key_file = tmp_path / "id" / I.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_file.chmod(0o644)
    with pytest.raises(UsageError, match="readable by other users"):
        I.load_or_create(tmp_path / "id")


async def handshake(server: I.NodeIdentity, client: I.NodeIdentity) -> tuple[bytes, bytes]:
    seen: dict[str, bytes] = {}

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, I.server_context(server), server_side=True)
        await tls.do_handshake()
        seen["server"] = I.peer_node_id(tls)
        await tls.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(stream, I.client_context(client), server_hostname="peer")
        await tls.do_handshake()
        assert tls.selected_alpn_protocol() == I.ALPN
        seen["client"] = I.peer_node_id(tls)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return seen["server"], seen["client"]


async def test_mutual_tls_binds_certificates_to_node_ids() -> None:
    a, b = I.NodeIdentity(keys.generate_key()), I.NodeIdentity(keys.generate_key())
    server_saw, client_saw = await handshake(a, b)
    assert server_saw == b.node_id and client_saw == a.node_id


async def test_a_client_without_a_certificate_is_refused() -> None:
    import ssl

    a = I.NodeIdentity(keys.generate_key())

    async def handler(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, I.server_context(a), server_side=True)
        with pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(stream, ctx, server_hostname="peer")
        with pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()
            await tls.receive_some(1)  # TLS 1.3: the refusal may arrive after the handshake
        nursery.cancel_scope.cancel()


def test_protocol_doc_states_the_network_ca_this_code_uses() -> None:
    """Another implementation builds the CA from docs/protocol.md; the doc must match the code."""
    from cryptography.hazmat.primitives import hashes, serialization

    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    ca_key, ca_cert, _ = I._network_ca()
    raw = ca_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert I._CA_SEED.decode() in doc
    assert raw.hex() in doc
    assert ca_cert.fingerprint(hashes.SHA256()).hex() in doc
    assert I._network_ca()[2].decode() in doc  # the CA certificate itself, in PEM


def test_a_node_certificate_is_as_protocol_doc_describes() -> None:
    """What another implementation must reproduce: v3, Ed25519, issuer the CA's name, CN the
    node id in hex (UTF8String), no extensions, signed by the CA key."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ident = I.NodeIdentity(keys.generate_key())
    cert = x509.load_pem_x509_certificate(ident.certificate_pem())
    ca_cert = I._network_ca()[1]
    assert cert.version is x509.Version.v3
    assert cert.issuer.public_bytes() == ca_cert.subject.public_bytes()
    (cn,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == ident.node_id.hex()
    utf8_string = b"\x0c\x28" + ident.node_id.hex().encode()  # tag 12, 40 bytes
    assert utf8_string in cert.subject.public_bytes()
    assert len(cert.subject.rdns) == 1 and len(cert.extensions) == 0
    assert cert.serial_number == int.from_bytes(ident.node_id[:16], "big") | 1
    cert.verify_directly_issued_by(ca_cert)
