"""The local demo network: an nginx CDN and a tracker on loopback, and the scripted run of
publishing, installing, updating, verifying and rolling back (``network``). Used by the demo,
tests and benchmarks; never by the product's own stages."""
