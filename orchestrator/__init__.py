"""The orchestrator: stores migration jobs in etcd and drives them through their phases."""
