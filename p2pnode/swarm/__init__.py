"""The peer-to-peer swarm: wire protocol (``wire``), and, as it lands, the peer state machine,
scheduler and the trio shell that runs them. See docs/protocol.md."""
