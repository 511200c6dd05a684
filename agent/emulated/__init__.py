"""The emulated NVMe migratable controller: the default backend, used by every test."""
