"""TrajectoryBuffer: assembles complete groups, checks versions, gates staleness and hands groups to the trainer exactly once."""
