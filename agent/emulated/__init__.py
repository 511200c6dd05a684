"""The emulated NVMe backend: the default, used by every test.

``controller`` is the backend (EmulatedController), a façade that drives ``model`` (an NVM
subsystem executing real NVMe commands): as the guest, with I/O commands on a secondary
controller; as the host, through the host-side migration driver in ``agent.nvme``, which
``model_transport`` connects to the model's primary controller in this process.
"""
