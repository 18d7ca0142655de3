"""Finding peers: the race between sources (``race``), the Kademlia DHT and LAN multicast
(``dht``), and the tracker's client, which is also a source of peers (``tracker``)."""
