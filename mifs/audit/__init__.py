"""The audit trail: who accessed what through the mount, tamper-evident, shipped to the store."""
