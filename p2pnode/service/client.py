"""The command line as a client of the daemon's local API (``p2pnode add``, ``jobs``, ...).

Why a client and not the Service itself: the daemon owns the state dir (its lock), so a second
process must not write the library or the queue; it asks the daemon, which checks, saves and
announces the change like any other (the page sees it at once). The verbs find the daemon from
``--api URL`` or ``$P2PNODE_API``, else from ``STATE/api.json`` (the state dir: ``--state DIR``,
``$P2PNODE_STATE``, or the user data dir), and send the token from ``STATE/api-token``
(``$P2PNODE_API_TOKEN`` overrides it, for a client without access to the state dir).

``node/cli.py`` dispatches these verbs here (:func:`add_client_verbs`); this module also holds
:func:`refuse_managed_dest`, which the standalone verbs (``install``, ``update``, ``verify``,
``rollback``, ``watch``) call so they never work on a DEST under the daemon's feet.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DamagedStateError, JobStateError, TransportError, UsageError
from ..units import format_bytes
from .statedir import StateDir, default_state_dir

if TYPE_CHECKING:
    import httpx

__all__ = ["ApiClient", "add_client_verbs", "refuse_managed_dest", "state_dir_from"]

TIMEOUT = 10.0
#: Finished jobs `p2pnode jobs` shows on a terminal without --all (--json has them all).
HISTORY_SHOWN = 10


def state_dir_from(arg: str | None) -> Path:
    """``--state DIR``, else ``$P2PNODE_STATE``, else the user data dir (as the daemon)."""
    if arg:
        return Path(arg)
    env = os.environ.get("P2PNODE_STATE")
    return Path(env) if env else default_state_dir()


class ApiClient:
    """One daemon's API: where it is, its token, and calls that raise our errors."""

    def __init__(self, url: str, token: str | None, state: Path) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.state = state
        import httpx  # these load with the client verbs only: every verb builds the parser

        from .apischema import PREFIX

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport, base = None, self.url
        if url.startswith(("unix:", "http+unix:")):  # a Unix socket: the Host is a bare name
            transport = httpx.HTTPTransport(uds=url.split("unix:", 1)[1])
            base = "http://localhost"
        self._http = httpx.Client(
            base_url=base + PREFIX, headers=headers, timeout=TIMEOUT, transport=transport
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ApiClient:
        state = state_dir_from(getattr(args, "state", None))
        sd = StateDir(state)
        url = getattr(args, "api", None) or os.environ.get("P2PNODE_API") or sd.api_address()
        if url is None:
            raise TransportError(
                f"no daemon is running on {state} (it has no {sd.api_file.name})",
                fix="start it with `p2pnode daemon --api 127.0.0.1:0`, or pass --api URL",
            )
        if not url.startswith(("http://", "https://", "unix:", "http+unix:")):
            url = f"http://{url}"
        token = os.environ.get("P2PNODE_API_TOKEN") or sd.read_api_token()
        return cls(url, token, state)

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            r = self._http.request(method, path.lstrip("/"), json=body)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._answer(r)

    def _unreachable(self, exc: Exception) -> TransportError:
        return TransportError(
            f"no daemon is running on {self.state} (nothing answers at {self.url}: {exc})",
            fix="start it with `p2pnode daemon`, or pass --api URL",
        )

    @staticmethod
    def _answer(r: httpx.Response) -> Any:
        try:
            doc = r.json()
        except ValueError:
            doc = {}
        if r.status_code < 400:
            return doc
        message = doc.get("error") if isinstance(doc, dict) else None
        fix = doc.get("fix") if isinstance(doc, dict) else None
        message = message or f"the daemon answered HTTP {r.status_code}"
        if r.status_code == 409:
            raise JobStateError(message, fix=fix)
        if r.status_code < 500:
            raise UsageError(message, fix=fix or "check the command line")
        raise TransportError(message, fix=fix or "see the daemon's output")

    def events(self) -> Iterator[dict[str, Any]]:
        """The push stream's snapshots, until the daemon goes away."""
        import httpx

        try:
            with self._http.stream("GET", "events", timeout=httpx.Timeout(TIMEOUT, read=60.0)) as r:
                if r.status_code >= 400:
                    r.read()
                    self._answer(r)
                data: list[str] = []
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield json.loads("\n".join(data))
                        data = []
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc


# Rendering -------------------------------------------------------------------------------


def _percent(job: dict[str, Any]) -> float | None:
    total = job.get("bytes_total")
    return 100.0 * job["bytes_done"] / total if total else None


def jobs_table(jobs: list[dict[str, Any]]) -> Any:
    """The jobs as a rich table, a bar per job (for ``jobs`` and ``jobs --watch``)."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("id", "app", "kind", "state", "priority", "progress", "done", "rate", "peers"):
        table.add_column(col, justify="right" if col in ("done", "rate", "peers") else "left")
    for j in jobs:
        pct = _percent(j)
        bar = ProgressBar(total=100.0, completed=pct or 0.0, width=24)
        done = format_bytes(j["bytes_done"])
        if j.get("bytes_total"):
            done += f" / {format_bytes(j['bytes_total'])}"
        rate = f"{format_bytes(j['rate'])}/s" if j.get("rate") else ""
        prio = j.get("priority", "") + (" critical" if j.get("critical") else "")
        peers = (j.get("progress") or {}).get("peers")
        peers = str(peers) if peers is not None and j["state"] == "downloading" else ""
        table.add_row(
            j["id"], j.get("app") or "?", j["kind"], j["state"], prio, bar, done, rate, peers
        )
    return table


# Verbs -----------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient.from_args(args)


def cmd_add(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": args.source,
        "dest": os.path.realpath(os.path.abspath(args.dest)),
        "trust": args.trust or [],
        "channel": args.channel,
        "priority": args.priority,
    }
    if args.tracker:
        body["tracker"] = args.tracker
    if args.no_auto_update:
        body["auto_update"] = False
    out: dict[str, Any] = _client(args).call("POST", "/library", body)
    if not args.json:
        e = out["entry"]
        print(f"added {e['source']} as {e['id']} into {e['dest']}; install queued as {out['id']}")
    return out


def cmd_jobs(args: argparse.Namespace) -> dict[str, Any]:
    client = _client(args)
    if args.watch:
        return _watch(args, client)
    jobs = client.call("GET", "/jobs")["jobs"]
    if not args.json:  # a terminal gets the unfinished jobs and the newest of the history
        from rich.console import Console

        shown = jobs
        if not args.all:
            done = [j for j in jobs if j["state"] in ("installed", "cancelled")]
            shown = [j for j in jobs if j not in done] + done[:HISTORY_SHOWN]
        console = Console()
        console.print(jobs_table(shown) if shown else "no jobs")
        for j in shown:
            if j["state"] == "failed" and j.get("error"):
                console.print(f"{j['id']} failed: {j['error']}", markup=False, highlight=False)
    return {"jobs": jobs}  # scripts get every job, history included


def _watch(args: argparse.Namespace, client: ApiClient) -> dict[str, Any]:
    """Live progress from the push stream until Ctrl-C, the normal way out (``--json``: one
    line per snapshot)."""
    last: dict[str, Any] = {"jobs": []}
    try:
        if args.json:
            for snap in client.events():
                last = snap
                print(json.dumps({"event": "snapshot", "jobs": snap["jobs"]}), flush=True)
            return {"jobs": last["jobs"]}
        from rich.live import Live

        with Live(jobs_table([]), refresh_per_second=4) as live:
            for snap in client.events():
                last = snap
                live.update(jobs_table(snap["jobs"]))
    except KeyboardInterrupt:
        pass
    return {"jobs": last["jobs"]}


def cmd_job_action(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = _client(args).call("POST", f"/jobs/{args.id}/{args.verb}")
    if not args.json:
        print(f"job {out['id']} ({out.get('app')}): {out['state']}")
    return out


def cmd_priority(args: argparse.Namespace) -> dict[str, Any]:
    body = {"priority": args.priority}
    out: dict[str, Any] = _client(args).call("POST", f"/jobs/{args.id}/priority", body)
    if not args.json:
        print(f"job {out['id']} ({out.get('app')}): priority {out['priority']}")
    return out


def cmd_move(args: argparse.Namespace) -> dict[str, Any]:
    """``move ID|DEST --to NEWDEST``: a library entry by its id, or by the DEST it holds."""
    client = _client(args)
    ident = args.entry
    if not re.fullmatch(r"g[0-9]+", ident):
        where = os.path.realpath(os.path.abspath(ident))
        entries = client.call("GET", "/library")["entries"]
        found = [e["id"] for e in entries if e["dest"] == where]
        if not found:
            raise UsageError(
                f"no library entry has DEST {where}",
                fix="name the entry by its id (g1) or its DEST; `p2pnode jobs` lists them",
            )
        ident = found[0]
    to = os.path.realpath(os.path.abspath(args.to))
    body = {"to": to, "priority": args.priority}
    out: dict[str, Any] = client.call("POST", f"/library/{ident}/move", body)
    if not args.json:
        print(f"move of {ident} to {to} queued as {out['id']}")
    return out


def _setting_value(key: str, text: str) -> Any:
    """``default`` resets; schedules are JSON; counts are numbers; rates stay text (K/M/G)."""
    if text == "default":
        return None
    if key in ("alt_speed", "update_window"):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UsageError(
                f"{key} must be a JSON list of windows: {exc}",
                fix=f'e.g. \'[{{"days": "weekdays", "begin": "18:00", "end": "23:00"}}]\' '
                f"for {key}",
            ) from None
    return int(text) if text.isdigit() and key == "max_active" else text


def cmd_settings(args: argparse.Namespace) -> dict[str, Any]:
    client = _client(args)
    if args.value is not None:
        view = client.call("PATCH", "/settings", {args.key: _setting_value(args.key, args.value)})
    else:
        view = client.call("GET", "/settings")
    if args.key is not None and args.key not in view:
        raise UsageError(f"{args.key!r} is not a setting", fix="run `p2pnode settings` for all")
    shown = {args.key: view[args.key]} if args.key else view
    if not args.json:
        for k, v in shown.items():
            print(f"{k} = {json.dumps(v)}")
    return dict(view) if args.key is None else {"key": args.key, "value": view[args.key]}


def cmd_web(args: argparse.Namespace) -> dict[str, Any]:
    """The page's login URL (it carries the token: the page turns it into a cookie)."""
    client = _client(args)
    client.call("GET", "/settings")  # fails clearly if there is no daemon or a wrong token
    if client.token is None:
        raise UsageError(f"no API token in {client.state}", fix="pass --state DIR of the daemon")
    url = f"{client.url}/?token={client.token}"
    if not args.json:
        print(url)
    return {"url": url}


def add_client_verbs(sub: Any, common: argparse.ArgumentParser) -> None:
    """The client verbs on ``p2pnode``'s subparsers (``sub``), with its ``--json`` flags."""
    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument(
        "--api",
        metavar="URL",
        help="the daemon's API (default: $P2PNODE_API, else the state dir's api.json)",
    )
    client.add_argument(
        "--state",
        metavar="DIR",
        help="the daemon's state dir (default: $P2PNODE_STATE, else the user data dir)",
    )

    p = sub.add_parser("add", parents=[client], help="add a game to the daemon's library")
    p.add_argument("source", help="app name (with --tracker) or manifest URL")
    p.add_argument("--dest", required=True, metavar="DIR")
    p.add_argument("--trust", action="append", metavar="ed25519:HEX", required=True)
    p.add_argument("--tracker", metavar="URL")
    p.add_argument("--channel", default="stable")
    p.add_argument("--priority", default="normal", choices=("high", "normal", "low"))
    p.add_argument("--no-auto-update", action="store_true", help="updates only on request")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("jobs", parents=[client], help="the daemon's jobs")
    p.add_argument("--watch", action="store_true", help="live progress until Ctrl-C")
    p.add_argument("--all", action="store_true", help="the whole history on a terminal")
    p.set_defaults(func=cmd_jobs)

    for verb in ("pause", "resume", "cancel"):
        p = sub.add_parser(verb, parents=[client], help=f"{verb} a daemon job")
        p.add_argument("id", help="job id (j3), or a library entry's id (g1) for its job")
        p.set_defaults(func=cmd_job_action, verb=verb)

    p = sub.add_parser(
        "move", parents=[client], help="move an installed game (with your files) to a new DEST"
    )
    p.add_argument("entry", metavar="ID|DEST", help="library entry id (g1), or its DEST")
    p.add_argument("--to", required=True, metavar="NEWDEST", help="a new or empty directory")
    p.add_argument("--priority", default="normal", choices=("high", "normal", "low"))
    p.set_defaults(func=cmd_move)

    p = sub.add_parser("priority", parents=[client], help="change a daemon job's priority")
    p.add_argument("id")
    p.add_argument("priority", choices=("high", "normal", "low", "top"))
    p.set_defaults(func=cmd_priority)

    p = sub.add_parser("settings", parents=[client], help="show or change the daemon's settings")
    p.add_argument("key", nargs="?")
    p.add_argument("value", nargs="?", help="rates with K/M/G, 0 for no cap; `default` resets")
    p.set_defaults(func=cmd_settings)

    p = sub.add_parser("web", parents=[client], help="print the daemon's web page URL")
    p.set_defaults(func=cmd_web)


def refuse_managed_dest(dest: str, verb: str) -> None:
    """Raise UsageError if the daemon's library (read without its lock) holds ``dest``.

    A damaged or unreadable library does not stop a standalone verb: the daemon reports it.
    """
    from .library import Library

    path = StateDir(state_dir_from(None)).library
    try:
        entry = Library.load(path).at_dest(os.path.realpath(os.path.abspath(dest)))
    except (DamagedStateError, OSError):
        return
    if entry is None:
        return
    raise UsageError(
        f"{dest} is managed by the p2pnode daemon (library entry {entry.id}, {entry.source}); "
        f"`p2pnode {verb}` would change it under the daemon",
        fix=f"let the daemon do it: `p2pnode jobs` shows its work, `p2pnode pause|resume|cancel "
        f"{entry.id}` controls it; or pick another --dest",
    )
