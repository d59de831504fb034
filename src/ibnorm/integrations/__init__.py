"""Optional integrations with third-party model libraries (imported on use)."""
