"""Developer tools run from the repository: genproto (the protobuf stubs), install_helm (the chart check's helm)."""
