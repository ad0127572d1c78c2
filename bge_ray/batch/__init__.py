"""Ray Data batch pipelines: corpus embedding (and, on top of it, mining and teacher scoring)."""
