"""The trainer side, which never commits: the coordinator, staging, and torch serialisation."""
