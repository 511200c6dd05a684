"""What the orchestrator and the agents share: the etcd key layout and the records kept there."""
