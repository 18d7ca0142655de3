"""The client service: one long-running node per machine that keeps a library of games.

This package holds the service's sans-IO cores and their persistence: the ``library`` of
entries (what the machine holds and follows), the job ``queue`` (what to download next, in
what order, how many at once), the bandwidth ``schedule`` and update windows, and the
``statedir`` that keeps all of it (plus the API token and the one-daemon lock). None of them
does I/O beyond reading and writing its own files, and none reads the clock: ``now`` is passed
in, and deadlines come back out, so the daemon (the trio shell, built on top) only waits and
acts. See ``docs/service.md``.
"""
