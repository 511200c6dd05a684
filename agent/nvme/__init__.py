"""NVMe wire formats shared by the emulated controller model and the real-device backends.

``spec`` holds the constants, ``commands`` the one submission/completion queue entry encoder, and
``cdq`` the Controller Data Queue (TP4159 user data migration queue) entry format and ring.
Everything here is pure: bytes in, values out, no I/O.
"""
