"""Organisations, users, memberships, roles and permissions, tokens, API keys and MFA."""
