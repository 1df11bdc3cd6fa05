"""The application layer: the ``sealmoe`` command, the local launcher, audit commands, wiring."""
