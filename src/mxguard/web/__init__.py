"""The dashboard, its JSON API and /metrics, served in the daemon's loop."""
