"""The game: the Action contract, maps and their split, the ViZDoom environment, levels and the explorer policy."""
