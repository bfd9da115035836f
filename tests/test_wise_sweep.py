"""The WISE sweep's setting parser (blueedit.bench.wise_sweep): typed extras, clear errors."""

from __future__ import annotations

import pytest

from blueedit.bench.wise_sweep import parse_setting
from blueedit.editing.wise import WiseConfig


def test_margins_act_ratio_and_typed_extras():
    base = WiseConfig(act_ratio=0.7)
    layer, w, extra = parse_setting("20:2:10:5/variant=retrieve,shard_size=10,merge_every=10,lr=0.5", base)
    assert layer == 20 and (w.alpha, w.beta, w.gamma, w.act_ratio) == (2.0, 10.0, 5.0, 0.7)
    assert (w.variant, w.shard_size, w.merge_every, w.lr) == ("retrieve", 10, 10, 0.5)
    assert extra == {"variant": "retrieve", "shard_size": 10, "merge_every": 10, "lr": 0.5}
    _, w, extra = parse_setting("24:5:20:10:1.0", base)
    assert w.act_ratio == 1.0 and extra == {} and w.variant == base.variant


@pytest.mark.parametrize("spec, match", [
    ("20:5:20", "expected LAYER"),
    ("x:5:20:10", "LAYER must be an integer"),
    ("20:5:20:10/shard=3", "not key=value"),
    ("20:5:20:10/alpha=3", "other than the margins"),
    ("20:5:20:10/shard_size=ten", "shard_size must be a int"),
    ("20:5:20:10/shard_size=30", "multiple"),
    ("20:5:20:10/variant=both", "variant"),
    ("20:5:20:10/context_lengths=5", "cannot be set here"),
])
def test_bad_settings_name_the_entry(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_setting(spec, WiseConfig(shard_size=500, merge_every=1000))
    assert spec in str(e.value)
