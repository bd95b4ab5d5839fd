import math

import pytest
import torch

from worldmodel.game.action import (ACTION_DIM, Action, ActionScriptError, decode_actions, dump_action_lines,
                               encode_actions, load_actions, parse_action_lines)


def test_encoding_round_trips_every_kind_of_action():
    g = torch.Generator().manual_seed(0)
    actions = [Action(move=m, strafe=s, turn=t, attack=a, use=u)
               for m in (-1, 0, 1) for s in (-1, 0, 1) for t in (-15.0, -7.25, -0.001, 0.0, 0.5, 3.333, 15.0)
               for a in (False, True) for u in (False, True)]
    actions += [Action(turn=round((torch.rand(1, generator=g).item() * 2 - 1) * 15, 3)) for _ in range(500)]
    enc = encode_actions(actions)
    assert enc.shape == (len(actions), ACTION_DIM) and enc.dtype == torch.float32
    assert decode_actions(enc) == actions
    for a in actions[:50]:
        assert Action.from_tensor(a.to_tensor()) == a


@pytest.mark.parametrize("kwargs", [dict(move=2), dict(strafe=-2), dict(move=0.5), dict(turn=math.nan),
                                    dict(turn=math.inf), dict(turn=15.5), dict(turn=-40), dict(attack=3),
                                    dict(move=True), dict(turn="left")])
def test_invalid_actions_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        Action(**kwargs)


def test_action_script_repeat_and_round_trip(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('# walk then turn\n{"move": 1, "repeat": 3}\n\n{"turn": -5.5, "attack": true}\n')
    actions = load_actions(p)
    assert actions == [Action(move=1)] * 3 + [Action(turn=-5.5, attack=True)]
    assert parse_action_lines(dump_action_lines(actions)) == actions
    assert len(dump_action_lines(actions)) == 2


@pytest.mark.parametrize("bad, line", [('{"move": 1}\n{"move": 2}\n', 2), ('{"move": 1}\n\nnot json\n', 3),
                                       ('{"jump": true}\n', 1), ('{"move": 1, "repeat": 0}\n', 1),
                                       ('[1, 2]\n', 1)])
def test_bad_script_line_is_named(tmp_path, bad, line):
    p = tmp_path / "bad.jsonl"
    p.write_text(bad)
    with pytest.raises(ActionScriptError, match=rf"bad\.jsonl: line {line}:"):
        load_actions(p)
