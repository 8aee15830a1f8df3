"""Random damage to the manifest and random config values: readers either refuse with a
GenuncError or return exactly what is there, never a silently shorter export or a bad config."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genunc.config import RULES, check_config, load_config
from genunc.errors import ConfigError, GenuncError
from genunc.export.store import _read_manifest

N = 8
GOOD = b"".join(json.dumps({"sample_id": f"{i:06d}", "score": i / 10,
                            "file": f"samples/{i:06d}.json"}).encode() + b"\n" for i in range(N))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, len(GOOD) - 1), junk=st.binary(min_size=1, max_size=12),
       cut=st.integers(0, 12))
def test_a_damaged_manifest_is_never_read_short(tmp_path, start, junk, cut):
    damaged = GOOD[:start] + junk + GOOD[start + cut:]
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(damaged)
    try:
        records = _read_manifest(path)
    except GenuncError:
        return  # refused, naming the line: nothing is lost
    torn_tail = not damaged.endswith(b"\n")  # only a torn last line may be dropped
    assert len(records) == N or (torn_tail and len(records) == N - 1), (damaged, len(records))


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                   st.text(max_size=6), st.lists(st.integers(-2, 3), max_size=3),
                   st.lists(st.text(max_size=4), max_size=3))


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(RULES)), value=VALUES)
def test_config_values_are_checked_or_refused(key, value):
    override = f"{key}={json.dumps(value)}"
    try:
        config = load_config(None, [override])
    except ConfigError:
        return
    check_config(config)  # whatever was accepted passes every rule


@pytest.mark.parametrize("override", ["generate.n_samples=3", "posterior.prior_precision=2.5",
                                      "posterior.sigma_noise=mle", "generate.scores=[random]",
                                      "generate.variability_steps=[0, 3]", "model=null"])
def test_good_values_are_accepted(override):
    load_config(None, [override])
