"""The platform's own surface: API root, status, liveness and readiness."""
