"""Usage analytics: events per minute (rolled up by the archiver), connections, API calls."""
