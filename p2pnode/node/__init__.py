"""The node's workflows, on top of every stage: install/update/rollback (``install``), verify
and repair (``verify``), following a channel (``watch``), reporting to the tracker
(``tracking``), the TOML config and the command line (``cli``)."""
