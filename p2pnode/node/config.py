"""Node defaults from a TOML file, so a fleet is pointed at its DHT once, not per command.

The file is ``config.toml`` in the user config directory (``platformdirs``), or the path in
``P2PNODE_CONFIG``, or ``--config PATH``. Missing is fine; anything unknown or mistyped is an
error naming the file and the key (a typo must not silently turn discovery off). Command-line
flags win over the file; ``dht_bootstrap`` lists are joined.

```toml
[discovery]
dht_port = 6881
dht_bootstrap = ["10.0.0.5:6881", "seed.example:6881"]
lan = true

[service]           # read by the client service's daemon only: p2pnode/service/settings.py
max_active = 2
```
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["NodeConfig", "default_config_path", "load_config"]


@dataclass(frozen=True)
class NodeConfig:
    dht_port: int | None = None
    dht_bootstrap: tuple[str, ...] = field(default_factory=tuple)
    lan: bool = False
    # The ``[service]`` table as written; ``p2pnode.service.settings`` checks it, since only
    # the daemon uses it (and the node layer must not import the service above it).
    service: dict[str, Any] = field(default_factory=dict, hash=False)


def default_config_path() -> Path:
    env = os.environ.get("P2PNODE_CONFIG")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir("p2pnode")) / "config.toml"


MAX_CONFIG_BYTES = 64 * 1024


def load_config(path: Path | None = None) -> NodeConfig:
    """The config at ``path`` (default: ``default_config_path()``; a missing default file
    means all defaults, a missing explicit one is an error).

    Raises:
        UsageError: unreadable, not TOML, or a key or value that is not understood.
    """
    explicit = path is not None
    path = path or default_config_path()
    try:
        data = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path} does not exist", fix="check --config") from None
        return NodeConfig()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise UsageError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc
    return _parse(doc, path)


def _parse(doc: dict[str, Any], path: Path) -> NodeConfig:
    def bad(key: str, want: str) -> UsageError:
        return UsageError(f"{path}: {key} must be {want}", fix=f"fix or remove {key} in {path}")

    unknown = set(doc) - {"discovery", "service"}
    if unknown:
        raise bad(sorted(unknown)[0], "one of the known sections ([discovery], [service])")
    service = doc.get("service", {})
    if not isinstance(service, dict):
        raise bad("service", "a table")
    disc = doc.get("discovery", {})
    if not isinstance(disc, dict):
        raise bad("discovery", "a table")
    unknown = set(disc) - {"dht_port", "dht_bootstrap", "lan"}
    if unknown:
        raise bad(f"discovery.{sorted(unknown)[0]}", "one of dht_port, dht_bootstrap, lan")
    port = disc.get("dht_port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
    ):
        raise bad("discovery.dht_port", "a UDP port number (0: any)")
    boot = disc.get("dht_bootstrap", [])
    if not isinstance(boot, list) or not all(isinstance(b, str) for b in boot) or len(boot) > 64:
        raise bad("discovery.dht_bootstrap", 'a list of at most 64 "HOST:PORT" strings')
    from ..discovery.dht.node import parse_hostport

    for b in boot:
        parse_hostport(b)  # a UsageError naming the bad entry
    lan = disc.get("lan", False)
    if not isinstance(lan, bool):
        raise bad("discovery.lan", "true or false")
    return NodeConfig(dht_port=port, dht_bootstrap=tuple(boot), lan=lan, service=service)
