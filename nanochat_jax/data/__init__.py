"""From text to batches: the tokenizer, documents and corpora, downloads, token shards, packing and grain loaders."""
