"""Zero-DB: an append-only key-value store compatible with 0-db v2 (files and RESP protocol).

`zdb.engine` owns the on-disk format and namespaces (plain synchronous Python);
the RESP server and its command families are built on top of it.
"""
