"""Agents, their versions, conversation sessions and runs."""
