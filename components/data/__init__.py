"""Shared by train, evaluate and predict: the shard records and reader, transforms, targets."""
