"""StreamVLN runtime: streams shards written by `pipeline` into the model (loader, model, trainer)."""
