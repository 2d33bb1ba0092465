"""Data: image folders, the digits demo and Parquet latent shards."""
