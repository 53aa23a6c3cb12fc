"""The second server (backup proxy): attach the exported duplicate, mount it read-only."""
