import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError, field_validator

from lorank.core.rank import (
    RankRule,
    RankRuleField,
    cutoff,
    delta,
    energy,
    fixed,
    fraction,
    parse_rule_field,
    resolve_rank,
    stable_rank,
    tolerance,
)
from lorank.errors import LorankError

# sigma = [4, 3, 2, 1]: squares 16, 9, 4, 1, total 30, ||sigma|| = sqrt(30) ~ 5.477.
# Tails ||sigma_{r+1:}||: r=0 sqrt30, r=1 sqrt14 ~ 3.742, r=2 sqrt5 ~ 2.236, r=3 1, r=4 0.
# Kept energy: r=1 16, r=2 25, r=3 29, r=4 30.
S4 = torch.tensor([4.0, 3.0, 2.0, 1.0])


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (fixed(2), 2),
        (fixed(9), 4),  # clamped to p
        (fraction(0.25), 1),
        (fraction(0.5), 2),
        (fraction(0.6), 3),  # ceil(2.4)
        (fraction(1.0), 4),
        # relative: 0.2 * sqrt30 ~ 1.095 -> first tail <= it is r=3 (tail 1)
        (tolerance(0.2), 3),
        # 0.5 * sqrt30 ~ 2.739 -> r=2 (tail sqrt5 ~ 2.236)
        (tolerance(0.5), 2),
        # 0.7 * sqrt30 ~ 3.834 -> r=1 (tail sqrt14 ~ 3.742)
        (tolerance(0.7), 1),
        (tolerance(0.0), 4),
        (tolerance(2.5, absolute=True), 2),
        (tolerance(1.0, absolute=True), 3),  # tail exactly 1 is allowed (<=)
        (tolerance(0.99, absolute=True), 4),
        (tolerance(100.0, absolute=True), 1),  # r=0 would do; clamped up to 1
        # energy: need kept >= (1-e)*30
        (energy(0.0), 4),
        (energy(0.1), 3),  # >= 27 -> 29
        (energy(0.2), 2),  # >= 24 -> 25
        (energy(0.5), 1),  # >= 15 -> 16
        # cutoff: sigma_i >= beta * 4
        (cutoff(0.75), 2),  # >= 3
        (cutoff(0.5), 3),  # >= 2
        (cutoff(0.25), 4),  # >= 1 (inclusive)
        (cutoff(0.0), 4),
        (cutoff(1.0), 1),
        # delta: sigma_i / 4 >= d
        (delta(0.0), 4),
        (delta(0.5), 3),
        (delta(0.26), 3),
        (delta(0.25), 4),
        # stable rank: 30 / 16 = 1.875
        (stable_rank(), 2),
        (stable_rank(1.5), 3),  # 2.8125
        (stable_rank(2.0), 4),  # 3.75
    ],
)
def test_rules_on_hand_spectrum(rule, expected):
    assert rule.select(S4) == expected


def test_fraction_ignores_float_noise():
    # 0.1 * 30 == 3.0000000000000004 in binary; must not round up to 4.
    assert fraction(0.1).select(torch.ones(30)) == 3
    assert resolve_rank(0.1, 30) == 3
    assert resolve_rank(0.7, 10) == 7


def test_stable_rank_exact_integer():
    # ||sigma||^2 / sigma_1^2 = 3 exactly; ceil must not give 4.
    assert stable_rank().select(torch.ones(3)) == 3


def test_unsorted_and_negative_values_use_magnitudes():
    assert cutoff(0.5).select(torch.tensor([1.0, -4.0, 2.0, 3.0])) == 3


@pytest.mark.parametrize(
    "rule",
    [
        tolerance(0.1),
        tolerance(0.1, absolute=True),
        energy(0.01),
        cutoff(0.1),
        delta(0.0),
        stable_rank(),
        cutoff(0.0),
    ],
)
def test_all_zero_spectrum_gives_r_min(rule):
    z = torch.zeros(5)
    assert rule.select(z) == 1
    assert rule.select(z, r_min=3) == 3


@pytest.mark.parametrize(
    "rule",
    [fixed(3), fraction(0.5), tolerance(0.1), energy(0.1), cutoff(0.5), delta(0.5), stable_rank()],
)
def test_single_value_spectrum(rule):
    assert rule.select(torch.tensor([2.5])) == 1
    assert rule.select(torch.tensor([0.0])) == 1


def test_full_rank_argument_for_core_spectrum():
    core = torch.tensor([5.0, 1.0])
    assert fraction(0.5).select(core, full_rank=10) == 5
    assert fixed(8).select(core, full_rank=10) == 8
    assert fixed(8).select(core) == 2
    assert cutoff(0.0).select(core, full_rank=10) == 2  # only the given values are counted
    with pytest.raises(ValueError):
        fixed(1).select(core, full_rank=1)


def test_clamp_edge_cases():
    assert tolerance(0.0).select(S4, r_max=2) == 2
    assert tolerance(10.0).select(S4, r_min=3) == 3
    assert fixed(1).select(S4, r_min=6) == 4  # r_min above p: p
    assert fixed(4).select(S4, r_min=3, r_max=2) == 2  # r_min > r_max: r_max
    with pytest.raises(LorankError):
        fixed(1).select(S4, r_min=0)
    with pytest.raises(LorankError):
        fixed(1).select(S4, r_max=0)


def test_select_rejects_bad_sigma():
    with pytest.raises(ValueError):
        fixed(1).select(torch.ones(2, 2))
    with pytest.raises(ValueError):
        fixed(1).select(torch.ones(0))
    with pytest.raises(LorankError, match="NaN"):
        energy(0.1).select(torch.tensor([1.0, float("nan")]))


def test_select_ignores_autograd_and_dtype():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float32, requires_grad=True)
    assert tolerance(0.2).select(s) == 3
    assert isinstance(tolerance(0.2).select(s), int)


# --------------------------------------------------------------------------- properties

spectra = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-6, 1e3, allow_nan=False, allow_infinity=False)),
    min_size=1,
    max_size=40,
).map(lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64))
positive_spectra = st.lists(
    st.floats(1e-6, 1e3, allow_nan=False, allow_infinity=False), min_size=1, max_size=40
).map(lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64))
unit = st.floats(0.0, 1.0)


def _tail(s: torch.Tensor, r: int) -> float:
    return math.sqrt(math.fsum(float(x) ** 2 for x in s[r:]))


@settings(max_examples=200, deadline=None)
@given(positive_spectra, st.floats(0.0, 1.5), st.booleans())
def test_tolerance_guarantee(s, tau, absolute):
    r = tolerance(tau, absolute=absolute).select(s)
    bound = tau if absolute else tau * _tail(s, 0)
    slack = 1e-9 * (1.0 + bound)
    assert _tail(s, r) <= bound + slack  # what was discarded is within tolerance
    if r > 1:  # r == 1 may be the r_min clamp; otherwise r is the smallest such rank
        assert _tail(s, r - 1) > bound - slack


@settings(max_examples=100, deadline=None)
@given(positive_spectra, st.floats(0.0, 0.999))
def test_energy_guarantee(s, e):
    r = energy(e).select(s)
    total = math.fsum(float(x) ** 2 for x in s)
    kept = lambda k: math.fsum(float(x) ** 2 for x in s[:k])  # noqa: E731
    assert kept(r) >= (1 - e) * total * (1 - 1e-9)
    if r > 1:
        assert kept(r - 1) < (1 - e) * total * (1 + 1e-9)


@settings(max_examples=150, deadline=None)
@given(spectra, unit, unit, st.booleans())
def test_rank_non_increasing_in_threshold(s, a, b, absolute):
    lo, hi = min(a, b), max(a, b)
    assert tolerance(lo, absolute).select(s) >= tolerance(hi, absolute).select(s)
    assert cutoff(lo).select(s) >= cutoff(hi).select(s)
    assert delta(lo).select(s) >= delta(hi).select(s)
    lo_e, hi_e = min(lo, 0.999), min(hi, 0.999)
    assert energy(lo_e).select(s) >= energy(hi_e).select(s)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 500), st.floats(1e-6, 1.0), st.floats(1e-6, 1.0))
def test_fraction_non_decreasing(p, a, b):
    lo, hi = min(a, b), max(a, b)
    s = torch.ones(p)
    assert fraction(lo).select(s) <= fraction(hi).select(s)
    assert resolve_rank(lo, p) <= resolve_rank(hi, p)
    assert 1 <= resolve_rank(lo, p) <= p


rules = st.one_of(
    st.integers(1, 60).map(fixed),
    st.floats(1e-6, 1.0).map(fraction),
    st.tuples(st.floats(0.0, 5.0), st.booleans()).map(lambda t: tolerance(*t)),
    unit.map(cutoff),
    st.floats(0.0, 0.999).map(energy),
    st.floats(0.01, 10.0).map(stable_rank),
    unit.map(delta),
)


@settings(max_examples=300, deadline=None)
@given(rules, spectra, st.integers(1, 50), st.one_of(st.none(), st.integers(1, 50)))
def test_clamp_always_within_bounds(rule, s, r_min, r_max):
    p = s.numel()
    r = rule.select(s, r_min=r_min, r_max=r_max)
    hi = p if r_max is None else min(r_max, p)
    assert isinstance(r, int)
    assert min(r_min, hi) <= r <= hi


@settings(max_examples=200, deadline=None)
@given(rules)
def test_parse_round_trips(rule):
    assert RankRule.parse(str(rule)) == rule


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rank=16", fixed(16)),
        ("fraction=0.25", fraction(0.25)),
        ("tolerance=0.1", tolerance(0.1)),
        ("abs-tolerance=0.5", tolerance(0.5, absolute=True)),
        ("cutoff=0.1", cutoff(0.1)),
        ("energy=0.01", energy(0.01)),
        ("stable-rank", stable_rank()),
        ("stable-rank=1.5", stable_rank(1.5)),
        ("delta=0.05", delta(0.05)),
        ("  Stable_Rank = 2 ", stable_rank(2.0)),
        ("abs_tolerance=1e-3", tolerance(1e-3, absolute=True)),
    ],
)
def test_parse_forms(text, expected):
    assert RankRule.parse(text) == expected


def test_canonical_strings():
    assert str(fixed(16)) == "rank=16"
    assert str(tolerance(0.5, absolute=True)) == "abs-tolerance=0.5"
    assert str(stable_rank()) == "stable-rank"
    assert str(stable_rank(1.5)) == "stable-rank=1.5"
    assert RankRule("stable_rank", None) == stable_rank(1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "rank",
        "rank=",
        "rank=0",
        "rank=-3",
        "rank=1.5",
        "rank=abc",
        "fraction=0",
        "fraction=1.5",
        "tolerance=-0.1",
        "tolerance=nan",
        "tolerance=inf",
        "energy=1",
        "energy=-0.1",
        "cutoff=1.5",
        "delta=-1",
        "stable-rank=0",
        "stable-rank=x",
        "svd=3",
        "energy 0.1",
        "tolerance",
    ],
)
def test_parse_rejects(text):
    with pytest.raises(LorankError) as info:
        RankRule.parse(text)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg


def test_parse_error_lists_forms():
    with pytest.raises(LorankError, match="abs-tolerance=T"):
        RankRule.parse("svd=3")


def test_constructor_validation():
    with pytest.raises(LorankError):
        RankRule("bogus", 1)  # type: ignore[arg-type]
    with pytest.raises(LorankError):
        RankRule("energy", 0.1, absolute=True)
    with pytest.raises(LorankError):
        fixed(True)  # type: ignore[arg-type]
    with pytest.raises(LorankError):
        fraction(None)  # type: ignore[arg-type]


def test_rule_is_frozen_and_hashable():
    rule = energy(0.01)
    with pytest.raises(AttributeError):
        rule.value = 0.5  # type: ignore[misc]
    assert len({energy(0.01), energy(0.01), cutoff(0.1)}) == 2


# --------------------------------------------------------------------------- resolve_rank


def test_resolve_rank_values():
    assert resolve_rank(16, 500) == 16
    assert resolve_rank(500, 500) == 500
    assert resolve_rank(0.5, 500) == 250
    assert resolve_rank(0.001, 500) == 1
    assert resolve_rank(1.0, 7) == 7
    assert resolve_rank(1, 1) == 1


def test_resolve_rank_too_large_message():
    with pytest.raises(LorankError) as info:
        resolve_rank(600, 500)
    assert str(info.value) == (
        "rank 600 exceeds the layer's full rank 500; use rank <= 500 or a fraction like 0.5"
    )


@pytest.mark.parametrize("bad", [0, -1, 1.5, 0.0, -0.5, float("nan"), float("inf"), True, "8"])
def test_resolve_rank_rejects(bad):
    with pytest.raises(LorankError):
        resolve_rank(bad, 500)


# --------------------------------------------------------------------------- pydantic


class _Cfg(BaseModel):
    rule: RankRuleField = energy(0.01)


class _Cfg2(BaseModel):
    rule: RankRule

    @field_validator("rule", mode="before")
    @classmethod
    def _rule(cls, v):
        return parse_rule_field(v)


def test_pydantic_field_alias():
    cfg = _Cfg(rule="tolerance=0.1")
    assert cfg.rule == tolerance(0.1)
    assert cfg.model_dump() == {"rule": "tolerance=0.1"}
    assert _Cfg.model_validate_json(cfg.model_dump_json()) == cfg
    assert _Cfg(rule=16).rule == fixed(16)
    assert _Cfg(rule=0.25).rule == fraction(0.25)
    assert _Cfg().rule == energy(0.01)
    assert _Cfg.model_json_schema()["properties"]["rule"]["type"] == "string"
    with pytest.raises(ValidationError, match="allowed forms"):
        _Cfg(rule="energy=2")


def test_pydantic_field_validator():
    assert _Cfg2(rule="stable-rank").rule == stable_rank()
    assert _Cfg2(rule=cutoff(0.1)).rule == cutoff(0.1)
    with pytest.raises(ValidationError, match="rank rule must be"):
        _Cfg2(rule=[1, 2])
