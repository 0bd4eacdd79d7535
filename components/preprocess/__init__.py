"""Stage 2: Parquet shards with a data-quality gate, and the streaming reader."""
