"""Checkpoints: what one holds, the commit protocol, finding the newest committed one, retention, and storage.

`layout` and `storage` are torch-free (used by `launch ckpt ls`); `checkpointer` runs inside training.
"""
