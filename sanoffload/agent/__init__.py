"""The first server's agent: quiesce a filesystem, duplicate its volume, export the duplicate."""
