"""Plumbing: artifacts (manifests, atomic writes, the output-directory protocol), config (typed configs and their declared effects), sharding (ranks, the work plan, who finishes an artifact)."""
