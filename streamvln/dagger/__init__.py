"""DAgger collection: the stage-1 model drives, the expert takes over when it goes wrong, executed trajectories become data."""
