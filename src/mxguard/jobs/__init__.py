"""Scheduled jobs run inside the daemon."""
