"""The exploration policy: human-like, covers every action, deterministic, gets unstuck."""
import numpy as np
import pytest

from worldmodel.game.action import TURN_MAX, Action
from worldmodel.game.policy import ExplorerPolicy, explorer_actions


def runs(values):
    """lengths of runs of equal consecutive values"""
    values = np.asarray(values)
    cut = np.flatnonzero(np.diff(values) != 0) + 1
    return np.diff(np.r_[0, cut, len(values)])


def test_action_statistics_cover_everything():
    acts = explorer_actions(5000, seed=0)
    assert all(isinstance(a, Action) for a in acts)
    move = np.array([a.move for a in acts])
    strafe = np.array([a.strafe for a in acts])
    turn = np.array([a.turn for a in acts])
    attack = np.array([a.attack for a in acts])
    use = np.array([a.use for a in acts])
    # mostly forward, but also standing, and backing up often enough for a world model to learn it
    assert 0.6 < (move == 1).mean() < 0.95
    assert 0.05 < (move == -1).mean() < 0.25 and (move == 0).sum() > 50
    # strafes both ways
    assert (strafe == -1).sum() > 50 and (strafe == 1).sum() > 50
    # turns both ways, at a spread of speeds, never beyond the limit
    assert (turn > 0.5).sum() > 200 and (turn < -0.5).sum() > 200
    speeds = np.abs(turn[np.abs(turn) > 0.05])
    assert np.percentile(speeds, 10) < 1.0 and np.percentile(speeds, 90) > 3.0 and speeds.max() > 8.0
    assert (speeds > 6).sum() > 50  # quick flicks as well as slow looks
    assert np.abs(turn).max() <= TURN_MAX
    # attack and use pressed
    assert attack.sum() > 20 and use.sum() > 10
    assert attack.mean() < 0.3 and use.mean() < 0.1
    # keys are held for varied durations, not flickered every tic
    move_runs = runs(move)
    assert np.median(move_runs) >= 5 and move_runs.max() >= 100 and move_runs.min() <= 10
    # the mouse moves smoothly: consecutive turn speeds are close
    assert np.median(np.abs(np.diff(turn))) < 0.5


def test_deterministic_for_a_seed():
    assert explorer_actions(500, seed=3) == explorer_actions(500, seed=3)
    assert explorer_actions(500, seed=3) != explorer_actions(500, seed=4)
    p = ExplorerPolicy(7)
    a = [p.act() for _ in range(100)]
    p.reset()
    assert [p.act() for _ in range(100)] == a


def test_straight_back_backs_off_with_the_mouse_at_rest():
    plain = explorer_actions(3000, seed=5)
    # off by default, and off draws nothing: the evaluation's episodes (the default explorer) are unchanged
    p = ExplorerPolicy(5, straight_back=0.0)
    assert [p.act() for _ in range(3000)] == plain

    def straight_runs(acts):
        still = np.array([a.move == -1 and a.turn == 0 and a.strafe == 0 for a in acts])
        return runs(still)[int(not still[0])::2] if still.any() else np.array([], int)

    p = ExplorerPolicy(5, straight_back=1.0)
    acts = [p.act() for _ in range(3000)]
    held = straight_runs(acts)
    # every backward hold of the free habits is straight: far more frames of long straight back-offs
    # than the default has (there only where a backward hold meets a pause of the mouse)
    plain_held = straight_runs(plain)
    assert (held >= 8).sum() >= 5 and held[held >= 8].sum() > 2 * plain_held[plain_held >= 8].sum()
    back = np.array([a.move == -1 for a in acts])
    still = np.array([a.move == -1 and a.turn == 0 and a.strafe == 0 for a in acts])
    assert still.sum() > 0.8 * back.sum()
    with pytest.raises(ValueError, match="straight_back"):
        ExplorerPolicy(0, straight_back=1.5)


def test_stuck_detection_turns_away():
    p = ExplorerPolicy(0)
    turned = 0.0
    for _ in range(120):  # the player never moves: it is stuck against something
        a = p.act(position=(0.0, 0.0, 0.0))
        turned += abs(a.turn)
    assert p.stuck_count >= 1
    assert turned > 90


@pytest.mark.parametrize("open_side", [1, -1])
def test_wall_ahead_turns_towards_open_side(open_side):
    depth = np.full((120, 160), 3, np.uint8)  # a wall right ahead
    if open_side == 1:
        depth[:, 110:] = 60  # room on the right
    else:
        depth[:, :50] = 60
    for seed in range(4):
        p = ExplorerPolicy(seed)
        total = 0.0
        for _ in range(12):
            total += p.act(position=None, depth=depth).turn
        if p.counts["avoid"]:
            assert np.sign(total) == open_side
            return
    pytest.fail("the policy never turned away from a wall ahead")


def test_close_to_a_wall_it_stops_or_backs_off_while_turning_away():
    depth = np.full((120, 160), 3, np.uint8)  # a wall right ahead, close
    moves = set()
    for seed in range(12):
        p = ExplorerPolicy(seed)
        for _ in range(8):
            a = p.act(position=None, depth=depth)
            if p.mode == "avoid" and a.move != 1:
                moves.add(a.move)
    assert moves == {0, -1}  # some avoids stop, some back off; none walks on into the wall


def test_explores_the_real_map():
    from worldmodel.game.doom import DoomEnv

    with DoomEnv(map="MAP01", seed=0, frame_size=(24, 32), depth=True) as env:
        p = ExplorerPolicy(0)
        env.reset()
        xs = []
        for _ in range(1200):
            env.step(p.act(env.position, env.depth))
            xs.append(env.position[:2])
    xs = np.array(xs)
    assert np.ptp(xs[:, 0]) + np.ptp(xs[:, 1]) > 500  # it gets around, not stuck in a corner
