"""The APIX real-time gateway: protocol, channels, broker, hub, presence, SSE, HTTP API."""
