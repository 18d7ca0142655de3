"""Run p2pnode's CLI, but kill -9 the process at the Nth call of a named function.

``P2PNODE_KILL_AT=module.function:N``. Random kill times rarely land in a step that takes
milliseconds (carrying the user's files across a switch); this lands a real SIGKILL exactly
before the Nth call, so a test can walk every step.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any


def main() -> int:
    target, nth = os.environ["P2PNODE_KILL_AT"].rsplit(":", 1)
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    from p2pnode.node.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
