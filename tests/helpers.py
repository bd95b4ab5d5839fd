"""Shared test helpers."""


def engines_of(pid: int) -> list[int]:
    """PIDs of the ViZDoom engines that process `pid` started (their config lives in its private
    `worldmodel-doom-<pid>-*` folder)."""
    from worldmodel.game.doom import find_engines

    return find_engines(f"worldmodel-doom-{pid}-")
