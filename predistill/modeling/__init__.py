"""Facts about models: spec resolution, loading, presets, FLOPs parameter counts (models), memory-light kernels, DCP checkpoints read without running code."""
