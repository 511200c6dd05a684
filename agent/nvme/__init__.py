"""NVMe as the agent speaks it: wire formats, and the host-side migration driver every backend uses.

Pure (bytes in, values out, no I/O): ``spec`` holds the constants, ``commands`` the one
submission/completion queue entry encoder, ``cdq`` the Controller Data Queue (TP4159 user data
migration queue) entry format and ring, ``state_format`` the versioned controller-state
container, ``error_log`` the error information the host reads after a failed command.

``migration_driver`` is the host side of TP4159 (suspend, resume, controller state in pieces,
the changed-LBA log), written once against an admin-command transport; it does I/O only through
the transport it is given.
"""
