"""The foundation every layer stands on: configuration (model sizes, presets, flags), common helpers (errors,
base dir, argument parsing, dtypes) and the sharding rules over a device mesh. Imports nothing else of the package."""
