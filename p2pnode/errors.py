"""The one exception tree of p2pnode.

Every error a user can meet says what went wrong *and* what to do about it: the CLI prints
``str(error)`` as its one-line message, so each class carries a default ``fix`` and callers may
pass a more specific one.

    P2PNodeError
    ├── UsageError               bad command-line input (a rate like "40Q", a missing flag)
    │   └── JobStateError        a job action its state does not allow (pause an installed job)
    ├── ManifestError            a manifest that cannot be parsed or breaks a format rule
    │   └── NotCanonicalError    decodes, but is not byte-identical to its canonical encoding
    ├── IntegrityError           content or metadata that fails a trust check
    │   ├── SignatureError       bad signature, or signed by a key that is not trusted
    │   │   └── UnknownKeyError  signed by a key not known yet (a rotation may name it)
    │   ├── ExpiredManifestError past its ``expires`` time (freeze attack)
    │   ├── DowngradeError       a build lower than the installed one (rollback attack), or
    │   │                        a second manifest for the installed build (equivocation)
    │   ├── UnsafePathError      a path that escapes the install root or collides
    │   ├── ChunkHashError       bytes whose blake3 is not the chunk id they claim
    │   ├── PatchError           a delta patch that does not produce its chunks (corrupt,
    │   │                        wrong base); the node fetches the chunks instead
    │   └── PeerRecordError      a malformed DHT/tracker peer record
    │       ├── RecordSignatureError  (also a SignatureError)
    │       ├── ExpiredRecordError
    │       └── LANMessageError       a malformed LAN discovery message
    ├── IncompatibleError        a genuine build this node cannot install (release.compat)
    │   ├── ClientTooOldError    the manifest's min_client is newer than this p2pnode
    │   └── PlatformError        the build is for other platforms than this machine
    ├── InstallError             local state problems
    │   ├── InstallLockedError   another p2pnode process works on the same install
    │   │   └── ServiceLockedError  another daemon owns the same state dir
    │   ├── DamagedStateError    a service state file (library, queue) we did not write
    │   ├── NotInstalledError    an operation that needs an install found none
    │   ├── NoRollbackError      no earlier version is kept
    │   ├── DiskSpaceError       not enough free space to stage the release
    │   └── DHTStateError        a damaged DHT routing-table file
    ├── TransportError           a network operation failed
    │   ├── CDNError             every mirror failed for some chunk
    │   ├── SlowPeerError        a peer took no bytes from us within the write timeout
    │   ├── DHTError             the DHT node cannot start or answer
    │   └── TrackerError         a tracker cannot be reached or fails (5xx)
    │       └── TrackerRefusedError  it refused the request (4xx: status, code)
    ├── ProtocolError            a peer broke the wire protocol (see p2pnode.swarm); abstract
    │   ├── LocalProtocolError
    │   └── RemoteProtocolError
    ├── DemoError                the local demo network did not come up or behave
    └── tracker.errors.TrackerError  (server side) 4xx APIError, 503 Unavailable:
                                 tracker/errors.py

Every class above is defined here; the modules that raise them (``discovery.tracker``,
``discovery.dht``, ``demo``) import them from here and re-export them. Outside the tree are
only exceptions that are control flow and never reach a caller: those whose name starts with
``_`` (``cdn.fetcher._JobFailure``, ``discovery.dht.node._BadRequest``) inside one module, and
``swarm.links.PeerFailed`` inside the swarm's shell (one peer is dropped, the reason goes to its
``PeerStats``), and ``service.apiguard.Refused`` inside the local API (answered as a 4xx JSON
error, never raised to a caller). ``node.cli._Failed`` is a P2PNodeError that carries a verb's
JSON payload to ``main``.

Misuse of the API is a bug in the caller, never one of these, so it is never mistaken for bad
input or a network failure: an argument no call could accept raises ``TypeError`` or
``ValueError`` (as Python's own functions do), a call in the wrong order or state raises
``RuntimeError``. Out of a nursery, such a bug is never hidden behind a typed error that a
sibling task raised meanwhile (``most_telling``).
"""

from __future__ import annotations

__all__ = [
    "BUG_TYPES",
    "CDNError",
    "ChunkHashError",
    "ClientTooOldError",
    "DHTError",
    "DHTStateError",
    "DamagedStateError",
    "DemoError",
    "DiskSpaceError",
    "DowngradeError",
    "ExpiredManifestError",
    "ExpiredRecordError",
    "IncompatibleError",
    "InstallError",
    "InstallLockedError",
    "IntegrityError",
    "JobStateError",
    "LANMessageError",
    "LocalProtocolError",
    "ManifestError",
    "NoRollbackError",
    "NotCanonicalError",
    "NotInstalledError",
    "P2PNodeError",
    "PatchError",
    "PeerRecordError",
    "PlatformError",
    "ProtocolError",
    "RecordSignatureError",
    "RemoteProtocolError",
    "ServiceLockedError",
    "SignatureError",
    "SlowPeerError",
    "TrackerError",
    "TrackerRefusedError",
    "TransportError",
    "UnknownKeyError",
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


class JobStateError(UsageError):
    """A request that the job's state does not allow (pause an installed job)."""

    default_fix = "list the jobs with `p2pnode jobs` and act on one in a state that allows it"


class ManifestError(P2PNodeError):
    default_fix = "fetch the manifest again from the publisher; it is damaged or not a manifest"


class NotCanonicalError(ManifestError):
    default_fix = "the manifest was altered after signing; fetch it again from the publisher"


class IntegrityError(P2PNodeError):
    default_fix = "the data was altered in transit or at rest; fetch it again from a trusted source"


class SignatureError(IntegrityError):
    default_fix = "pass the publisher's key with --trust ed25519:<hex>, or fetch a genuine manifest"


class UnknownKeyError(SignatureError):
    """Signed by a key this node does not know yet: the swarm asks the node's sources for the
    app's key rotations (node/rotations.py) once, then checks again."""

    def __init__(self, message: str, *, app: str, key: bytes) -> None:
        super().__init__(message)
        self.app, self.key = app, key


class ExpiredManifestError(IntegrityError):
    default_fix = "ask the publisher for a freshly signed manifest (or check this machine's clock)"


class DowngradeError(IntegrityError):
    default_fix = "use `p2pnode rollback` to go back to an earlier build on purpose"


class UnsafePathError(IntegrityError):
    default_fix = "the manifest is hostile or broken; do not install it"


class ChunkHashError(IntegrityError):
    default_fix = "the source served wrong bytes; it is skipped, retry to use another source"


class PatchError(IntegrityError):
    """A delta patch that does not decode, or whose output fails its chunks' blake3."""

    default_fix = "nothing to do: the chunks it was to produce are fetched instead"


class PeerRecordError(IntegrityError):
    """A peer record that is malformed, oversized, mis-signed or out of date."""

    default_fix = "the record came from a broken or hostile node; it is ignored"


class RecordSignatureError(PeerRecordError, SignatureError):
    """A peer record whose signature does not verify with the key it names."""


class ExpiredRecordError(PeerRecordError):
    """A peer record past its expiry (or claiming a lifetime longer than allowed)."""

    default_fix = "the announcer stopped re-announcing, or this machine's clock is wrong"


class LANMessageError(PeerRecordError):
    """A LAN discovery datagram that is not a well-formed query or answer."""


class IncompatibleError(P2PNodeError):
    """A genuine, trusted build that this node may not install (``release.compat``): refused
    before anything is fetched, and not retried until something changes (a newer build, or an
    upgraded p2pnode)."""

    default_fix = "install a build made for this machine and this p2pnode"


class ClientTooOldError(IncompatibleError):
    """The manifest's ``min_client`` is newer than this p2pnode."""

    default_fix = "upgrade p2pnode, then run the same command again"


class PlatformError(IncompatibleError):
    """The build names its platforms, and this machine is not one of them."""

    default_fix = "install the build published for this platform (ask the publisher which)"


class InstallError(P2PNodeError):
    default_fix = "run `p2pnode verify --dest DIR --repair`"


class InstallLockedError(InstallError):
    default_fix = "wait for the other p2pnode process to finish, or stop it"


class ServiceLockedError(InstallLockedError):
    """Another client service (daemon) owns the same state dir."""

    default_fix = "stop the other daemon, or give this one its own --state DIR"


class DamagedStateError(InstallError):
    """A service state file (library, queue, settings) that is not what we wrote."""

    default_fix = "move the named file aside (the daemon starts without it) and re-add what it held"


class NotInstalledError(InstallError):
    default_fix = "install a release first with `p2pnode install MANIFEST --dest DIR`"


class NoRollbackError(InstallError):
    default_fix = "no earlier version is kept; install the wanted build's manifest explicitly"


class DiskSpaceError(InstallError):
    default_fix = "free disk space on the install's filesystem, or install elsewhere"


class DHTStateError(InstallError):
    """The saved routing table cannot be read; the node starts without it."""

    default_fix = "delete the routing table file; it is rebuilt from --dht-bootstrap"


class TransportError(P2PNodeError):
    default_fix = "check the network and the mirror URLs, then run the same command again"


class CDNError(TransportError):
    default_fix = "check the mirrors (--mirror URL) are up and serve this release, then retry"


class SlowPeerError(TransportError):
    """A peer stopped reading (or reads too slowly for one write to finish in time): it would
    hold its connection and an upload slot for as long as it liked."""

    default_fix = "nothing to do: the peer is disconnected and others are served"


class DHTError(TransportError):
    """The DHT could not be started or used (port in use, no bootstrap reachable)."""

    default_fix = "check --dht-port is free and --dht-bootstrap names a reachable DHT node"


class TrackerError(TransportError):
    """The tracker could not be reached, or failed (5xx)."""

    default_fix = "check the --tracker URL and that the tracker is running, then retry"


class TrackerRefusedError(TrackerError):
    """The tracker refused the request (4xx); ``code`` is its machine-readable reason."""

    def __init__(self, message: str, *, status: int, code: str, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.status = status
        self.code = code


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


class DemoError(P2PNodeError):
    default_fix = "run the demo again; if it fails the same way, report it with its output"


#: Built-in exceptions that mean the code is wrong rather than the input or the world: out of
#: a group of concurrent failures one of these outweighs any typed error (see ``most_telling``).
BUG_TYPES: tuple[type[Exception], ...] = (
    TypeError,
    ValueError,
    AttributeError,
    NameError,
    LookupError,
    AssertionError,
    ArithmeticError,
    RuntimeError,
    ImportError,
)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def most_telling(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a user should see out of concurrent tasks' failures.

    A bug (a ``BUG_TYPES`` leaf that is not one of ours) in any task wins: the group itself
    is returned, for the caller to raise with every traceback, because a typed error raised
    by a sibling meanwhile (often *because* of the bug) would send the user after the wrong
    cause. Otherwise an interrupt, then a full disk (the root cause of everything else
    failing), then any of our typed errors; the group itself if none of those is in it.
    """
    leaves = _leaves(group)
    if any(isinstance(leaf, BUG_TYPES) and not isinstance(leaf, P2PNodeError) for leaf in leaves):
        return group
    for kind in (KeyboardInterrupt, DiskSpaceError, P2PNodeError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group
