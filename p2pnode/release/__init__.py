"""What a publisher makes and every node trusts: the signed manifest and its canonical bencode,
content-defined chunking, Ed25519 keys, the CDN layout, and the ``publish`` workflow.

The first stage of a chunk's path; nothing here imports the stages after it except
``publish``'s use of the disk's atomic write.
"""
