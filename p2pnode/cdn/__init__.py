"""Fetching chunks by HTTP range from CDN mirrors: the sans-IO range plan (``plan``, with byte
ranges and chunk splitting in ``ranges`` and mirror health and backoff in ``health``), the trio
fetcher that runs it (``fetcher``) and the HTTP transport under it (``transport``); which
mirrors to ask (``mirrors``) and the size-bounded manifest download (``manifest``)."""
