"""NBD access to the controllers an agent runs: real block clients as the guest (server.py)."""
