"""Stage 4: inference over the val shards, PQ (panopticapi's numbers), the report."""
