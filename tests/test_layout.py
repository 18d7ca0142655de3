"""The package's folders are the stages of a chunk's path: each imports only the stages before
it (docs/architecture.md, "The map"). A new arrow against the flow fails here, naming it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "p2pnode"

#: The stage of each subpackage; a module may import stages of a lower rank only.
RANK = {
    "release": 0,
    "cdn": 1,
    "disk": 1,
    "swarm": 2,
    "discovery": 2,
    "node": 3,
    "service": 4,
    "demo": 5,
}

#: The arrows against the grain that docs/architecture.md names and explains.
ALLOWED = {
    ("p2pnode.release.publish", "p2pnode.disk.fsutil"),
    ("p2pnode.node.cli", "p2pnode.demo.network"),
    ("p2pnode.node.cli", "p2pnode.service.daemon"),
    ("p2pnode.node.cli", "p2pnode.service.client"),
}


def _imports(path: Path) -> list[str]:
    """Absolute names of the p2pnode modules ``path`` imports (relative imports resolved)."""
    package = ["p2pnode", *path.relative_to(ROOT).parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                base += node.module.split(".") if node.module else []
            else:
                base = (node.module or "").split(".")
            if base[0] != "p2pnode":
                continue
            if len(base) == 1:  # from p2pnode import x / from .. import x
                found += [f"p2pnode.{a.name}" for a in node.names]
            else:
                found.append(".".join(base))
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("p2pnode.")]
    return found


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_imports_point_down_the_data_flow() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        me = ".".join(["p2pnode", *path.relative_to(ROOT).with_suffix("").parts])
        mine = _stage(me)
        if mine is None:
            continue
        for target in _imports(path):
            theirs = _stage(target)
            if theirs is None or theirs == mine or (me, target) in ALLOWED:
                continue
            if RANK[theirs] >= RANK[mine]:
                wrong.append(f"{me} imports {target}")
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_shared_modules_import_no_stage() -> None:
    """errors, progress, ratelimit and units sit under every stage; identity (the node's key
    and TLS certificates) builds on release's Ed25519 keys and on nothing later."""
    wrong = []
    for path in sorted(ROOT.glob("*.py")):
        if path.name in ("__main__.py", "__init__.py"):
            continue
        for target in _imports(path):
            stage = _stage(target)
            if stage is not None and (path.stem, stage) != ("identity", "release"):
                wrong.append(f"p2pnode.{path.stem} imports {target}")
    assert not wrong, "\n".join(wrong)
