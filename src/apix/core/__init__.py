"""Shared kernel: errors, ids, JSON and logging. Imports no domain."""
