"""Fetching chunks by HTTP range from CDN mirrors: the sans-IO range plan (``plan``), the trio
fetcher that runs it (``fetcher``) and the HTTP transport under it (``transport``)."""
