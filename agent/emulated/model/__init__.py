"""The emulated NVMe controller model: an NVM subsystem that executes real submission queue entries.

``subsystem`` is the entry point (``NvmeSubsystemModel``); ``migration`` carries out the TP4159
commands, ``controllers`` holds per-controller state, ``structures`` builds Identify and log
pages, ``namespace`` stores blocks in sparse files, ``hostmem`` is the memory the controller
reaches by DMA, and ``checks`` holds the field checks the handlers share.
"""
