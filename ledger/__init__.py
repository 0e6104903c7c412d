"""The capability ledger: an Ed25519-signed, hash-chained, Merkle-tree WORM log."""
