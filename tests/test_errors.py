"""The one exception tree, and what comes out of a nursery whose tasks failed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import trio

import p2pnode
from p2pnode import errors
from p2pnode.errors import (
    CDNError,
    DiskSpaceError,
    P2PNodeError,
    TrackerError,
    TransportError,
    most_telling,
)
from p2pnode.node import cli
from p2pnode.node.watch import _our_error

#: Control flow that never reaches a caller, drawn in errors.py's note instead of its tree.
INTERNAL = {"p2pnode.swarm.links.PeerFailed", "p2pnode.service.apiguard.Refused"}


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(p2pnode.__path__, "p2pnode.")]
    return [n for n in names if not n.endswith("__main__")]


def test_every_public_exception_is_defined_in_errors_and_rooted_there() -> None:
    for name in _modules():
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if not (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            if not obj.__module__.startswith("p2pnode") or attr.startswith("_"):
                continue
            if f"{obj.__module__}.{obj.__qualname__}" in INTERNAL:
                assert obj.__qualname__ in (errors.__doc__ or "")
                continue
            assert obj.__module__ == "p2pnode.errors", f"{name}.{attr} is not in errors.py"
            assert issubclass(obj, P2PNodeError), f"{attr} is outside the tree"
            assert attr in errors.__all__, f"{attr} is not exported by errors.py"
            assert attr in (errors.__doc__ or ""), f"{attr} is not drawn in the tree"


def test_typed_errors_out_of_a_group_rank_interrupt_then_disk_then_ours() -> None:
    disk = DiskSpaceError("full")
    cdn = CDNError("down")
    assert most_telling(BaseExceptionGroup("g", [cdn, disk])) is disk
    assert most_telling(BaseExceptionGroup("g", [cdn, BaseExceptionGroup("h", [disk])])) is disk
    stop = KeyboardInterrupt()
    assert most_telling(BaseExceptionGroup("g", [disk, stop])) is stop
    assert most_telling(BaseExceptionGroup("g", [cdn, OSError("io")])) is cdn


@pytest.mark.parametrize("bug", [TypeError("x"), AttributeError("y"), KeyError("z")])
def test_a_bug_beside_a_typed_error_is_not_hidden(bug: Exception) -> None:
    group = BaseExceptionGroup("g", [TrackerError("down"), ExceptionGroup("h", [bug])])
    assert most_telling(group) is group
    with pytest.raises(BaseExceptionGroup) as info:
        _our_error(group)  # watch reports typed errors as events; a bug goes on up
    assert info.group_contains(type(bug))


async def _failing_tasks() -> None:
    """A nursery collapsed the way install, open_swarm and watch collapse theirs."""

    async def typed() -> None:
        raise TransportError("the network went away")

    async def buggy() -> None:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(typed)
            nursery.start_soon(buggy)
    except BaseExceptionGroup as group:
        raise most_telling(group) from None


def test_a_sibling_tasks_type_error_surfaces_out_of_a_nursery() -> None:
    with pytest.raises(BaseExceptionGroup) as info:
        trio.run(_failing_tasks)
    assert info.group_contains(TypeError)


def test_the_cli_raises_a_bug_instead_of_printing_a_typed_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def verb(args: object) -> dict[str, object]:
        trio.run(_failing_tasks)
        return {}

    monkeypatch.setattr(cli, "cmd_status", verb)
    with pytest.raises(BaseExceptionGroup) as info:
        cli.main(["status", "--dest", str(tmp_path)])
    assert info.group_contains(TypeError)


def test_the_cli_reports_a_group_of_typed_errors_as_the_most_telling(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def verb(args: object) -> dict[str, object]:
        raise BaseExceptionGroup("g", [CDNError("all mirrors failed"), DiskSpaceError("full")])

    monkeypatch.setattr(cli, "cmd_status", verb)
    assert cli.main(["status", "--dest", str(tmp_path)]) == DiskSpaceError.exit_code
    assert "full" in capsys.readouterr().err
