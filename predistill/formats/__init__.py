"""On-disk formats, each in one module with its writer and its checked reader."""
