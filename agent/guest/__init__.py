"""A stand-in for the VM: a guest workload that writes self-describing blocks, and its verifier."""
