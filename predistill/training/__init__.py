"""The mechanisms of training and scoring: losses, KD losses and sources, schedules, the shared forward pass, MiniPLM_prx, and the run directory (TrainConfig)."""
