"""The federation contract both sides share: config, keys and roster, wire messages, the
submission layout and global state, extras, durable writes, the ZeroMQ framing.

Imports no torch, so the commands that only read configs, keys and ledgers start fast.
"""
