"""The one exception tree of p2pnode.

Every error a user can meet says what went wrong *and* what to do about it: the CLI prints
``str(error)`` as its one-line message, so each class carries a default ``fix`` and callers may
pass a more specific one.

    P2PNodeError
    ├── UsageError               bad command-line input (a rate like "40Q", a missing flag)
    │   └── service.JobStateError  a job action its state does not allow (pause an installed job)
    ├── ManifestError            a manifest that cannot be parsed or breaks a format rule
    │   └── NotCanonicalError    decodes, but is not byte-identical to its canonical encoding
    ├── IntegrityError           content or metadata that fails a trust check
    │   ├── SignatureError       bad signature, or signed by a key that is not trusted
    │   ├── ExpiredManifestError past its ``expires`` time (freeze attack)
    │   ├── DowngradeError       a build lower than the installed one (rollback attack)
    │   ├── UnsafePathError      a path that escapes the install root or collides
    │   ├── ChunkHashError       bytes whose blake3 is not the chunk id they claim
    │   └── dht.PeerRecordError  a malformed DHT peer record
    │       ├── dht.RecordSignatureError  (also a SignatureError)
    │       ├── dht.ExpiredRecordError
    │       └── dht.LANMessageError       a malformed LAN discovery message
    ├── InstallError             local state problems
    │   ├── InstallLockedError   another p2pnode process works on the same install
    │   │   └── service.ServiceLockedError  another daemon owns the same state dir
    │   ├── service.DamagedStateError  a service state file (library, queue) we did not write
    │   ├── NotInstalledError    an operation that needs an install found none
    │   ├── NoRollbackError      no earlier version is kept
    │   ├── DiskSpaceError       not enough free space to stage the release
    │   └── dht.DHTStateError    a damaged DHT routing-table file
    ├── TransportError           a network operation failed
    │   ├── CDNError             every mirror failed for some chunk
    │   ├── SlowPeerError        a peer took no bytes from us within the write timeout
    │   ├── dht.DHTError         the DHT node cannot start or answer
    │   └── tracker_client.TrackerError         a tracker cannot be reached or fails (5xx)
    │       └── tracker_client.TrackerRefusedError  it refused the request (4xx: status, code)
    ├── tracker.core.APIError    (server side) a request the tracker refuses, as a 4xx JSON error
    └── ProtocolError            a peer broke the wire protocol (see p2pnode.swarm)
        ├── LocalProtocolError
        └── RemoteProtocolError

Misuse of the API (calling things in the wrong order) raises plain ``RuntimeError`` subclasses,
never one of these, so that it is never mistaken for bad input.
"""

from __future__ import annotations

__all__ = [
    "CDNError",
    "ChunkHashError",
    "DiskSpaceError",
    "DowngradeError",
    "ExpiredManifestError",
    "InstallError",
    "InstallLockedError",
    "IntegrityError",
    "LocalProtocolError",
    "ManifestError",
    "NoRollbackError",
    "NotCanonicalError",
    "NotInstalledError",
    "P2PNodeError",
    "ProtocolError",
    "RemoteProtocolError",
    "SignatureError",
    "SlowPeerError",
    "TransportError",
    "UnsafePathError",
    "UsageError",
    "most_telling",
]


class P2PNodeError(Exception):
    """Root of every error p2pnode raises on purpose.

    Args:
        message: what went wrong, naming the thing (file, URL, key) it went wrong with.
        fix: what the user should do; defaults to the class's ``default_fix``.
    """

    default_fix = "see `p2pnode --help`"
    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix if fix is not None else self.default_fix

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.fix})"


class UsageError(P2PNodeError):
    default_fix = "check the command line against `p2pnode COMMAND --help`"
    exit_code = 2


class ManifestError(P2PNodeError):
    default_fix = "fetch the manifest again from the publisher; it is damaged or not a manifest"


class NotCanonicalError(ManifestError):
    default_fix = "the manifest was altered after signing; fetch it again from the publisher"


class IntegrityError(P2PNodeError):
    default_fix = "the data was altered in transit or at rest; fetch it again from a trusted source"


class SignatureError(IntegrityError):
    default_fix = "pass the publisher's key with --trust ed25519:<hex>, or fetch a genuine manifest"


class ExpiredManifestError(IntegrityError):
    default_fix = "ask the publisher for a freshly signed manifest (or check this machine's clock)"


class DowngradeError(IntegrityError):
    default_fix = "use `p2pnode rollback` to go back to an earlier build on purpose"


class UnsafePathError(IntegrityError):
    default_fix = "the manifest is hostile or broken; do not install it"


class ChunkHashError(IntegrityError):
    default_fix = "the source served wrong bytes; it is skipped, retry to use another source"


class InstallError(P2PNodeError):
    default_fix = "run `p2pnode verify --dest DIR --repair`"


class InstallLockedError(InstallError):
    default_fix = "wait for the other p2pnode process to finish, or stop it"


class NotInstalledError(InstallError):
    default_fix = "install a release first with `p2pnode install MANIFEST --dest DIR`"


class NoRollbackError(InstallError):
    default_fix = "no earlier version is kept; install the wanted build's manifest explicitly"


class DiskSpaceError(InstallError):
    default_fix = "free disk space on the install's filesystem, or install elsewhere"


class TransportError(P2PNodeError):
    default_fix = "check the network and the mirror URLs, then run the same command again"


class CDNError(TransportError):
    default_fix = "check the mirrors (--mirror URL) are up and serve this release, then retry"


class SlowPeerError(TransportError):
    """A peer stopped reading (or reads too slowly for one write to finish in time): it would
    hold its connection and an upload slot for as long as it liked."""

    default_fix = "nothing to do: the peer is disconnected and others are served"


class ProtocolError(P2PNodeError):
    """A breach of the peer wire protocol; abstract, like h11's."""

    default_fix = "the peer is incompatible or hostile; it is disconnected"

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message, fix=fix)


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def most_telling(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a user should see out of concurrent tasks' failures: an interrupt, then
    a full disk (the root cause of everything else failing), then any of our typed errors;
    the group itself if none of those is in it."""
    leaves = _leaves(group)
    for kind in (KeyboardInterrupt, DiskSpaceError, P2PNodeError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group
