"""Reading and writing WebDataset shards: expansion, tar streaming, safe decoding."""
