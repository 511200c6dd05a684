"""The emulated NVMe backend: the default, used by every test.

``controller`` is the backend (EmulatedController), a façade that drives ``model`` (an NVM
subsystem executing real NVMe commands) through the encoder in ``agent.nvme``; ``state_format``
is the versioned controller-state container.
"""
