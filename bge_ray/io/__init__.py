"""Input and output: corpus readers (Ray Data), parquet shards, manifests, atomic writes."""
