"""Admission on its own: the two limits, the policy, and the per-address table.

The server calls Admission under its lock from the accept loop, from
connection threads that end and from the PROXY header's re-count; these
tests drive it directly, with any order of those calls hypothesis finds.
"""

from __future__ import annotations

import collections
import resource

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from threadserve import ConfigurationError, OverloadPolicy
from threadserve._admission import RESERVED_FDS, Admission, default_max_connections

ADDRESSES = ("10.0.0.1", "10.0.0.2", "10.0.0.3", None)


def test_the_total_limit_turns_away_whoever_comes_next() -> None:
    admission = Admission(2, None, "wait")
    assert admission.admit("10.0.0.1") is None
    assert admission.admit(None) is None
    assert admission.full
    assert admission.admit("10.0.0.2") == "over max_connections=2"
    admission.release(None)
    assert not admission.full
    assert admission.admit("10.0.0.2") is None


def test_one_address_cannot_take_every_slot() -> None:
    admission = Admission(10, 2, OverloadPolicy.REJECT)
    assert admission.admit("10.0.0.1") is None
    assert admission.admit("10.0.0.1") is None
    assert admission.admit("10.0.0.1") == "over max_connections_per_ip=2 for 10.0.0.1"
    assert admission.admit("10.0.0.2") is None, "another address still gets in"
    assert admission.active == 3


def test_a_proxied_client_is_counted_under_the_address_its_header_names() -> None:
    admission = Admission(10, 1, "wait")
    assert admission.admit(None) is None  # Behind a proxy: not yet known.
    assert admission.admit(None) is None
    assert admission.move(None, "192.0.2.7") is None
    assert admission.move(None, "192.0.2.7") == "over max_connections_per_ip=1 for 192.0.2.7"
    assert admission.active == 2, "moving never changes the total"


@pytest.mark.parametrize(
    ("settings_", "message"),
    [
        ((10, None, "drop"), "overload policy 'drop': choose one of wait, reject"),
        ((0, None, "wait"), "max_connections"),
        ((10, 0, "wait"), "max_connections_per_ip"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(
    settings_: tuple[int, int | None, str], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Admission(*settings_)


@pytest.mark.parametrize(
    ("soft", "expected"),
    [
        (20_000, (20_000 - RESERVED_FDS) * 3 // 4),  # A quarter is left to the handlers.
        (resource.RLIM_INFINITY, ((1 << 20) - RESERVED_FDS) * 3 // 4),
        (RESERVED_FDS, 1),  # Never below one connection.
    ],
)
def test_the_default_total_follows_the_open_file_limit(
    monkeypatch: pytest.MonkeyPatch, soft: int, expected: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, resource.RLIM_INFINITY))
    assert default_max_connections() == expected
    assert Admission(None, None, "wait").max_connections == expected


class AdmissionMachine(RuleBasedStateMachine):
    """Admissions, releases and moves in any order, against a plain model."""

    def __init__(self) -> None:
        super().__init__()
        self.admission = Admission(5, 2, "wait")
        self.live: list[str | None] = []  # One entry per admitted, live connection: its address.

    @rule(ip=st.sampled_from(ADDRESSES))
    def admit(self, ip: str | None) -> None:
        counts = collections.Counter(self.live)
        refusal = self.admission.admit(ip)
        if len(self.live) >= 5:
            assert refusal == "over max_connections=5"
        elif ip is not None and counts[ip] >= 2:
            assert refusal == f"over max_connections_per_ip=2 for {ip}"
        else:
            assert refusal is None
            self.live.append(ip)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ip = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
        self.admission.release(ip)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), new_ip=st.sampled_from(ADDRESSES))
    def move(self, data: st.DataObject, new_ip: str | None) -> None:
        index = data.draw(st.integers(0, len(self.live) - 1))
        old_ip = self.live[index]
        refusal = self.admission.move(old_ip, new_ip)
        over = new_ip is not None and new_ip != old_ip and self.live.count(new_ip) >= 2
        assert (refusal is not None) == over
        if refusal is None:
            self.live[index] = new_ip

    @invariant()
    def the_counts_match_the_live_connections(self) -> None:
        assert self.admission.active == len(self.live)
        assert self.admission.full == (len(self.live) >= 5)
        expected = collections.Counter(ip for ip in self.live if ip is not None)
        # The table holds only addresses with live connections: it cannot grow without bound.
        assert self.admission._per_ip == dict(expected)


# No deadline: a busy machine may pause the process mid-example, which says nothing of Admission.
AdmissionMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
test_admission_counts_hold_in_any_order = AdmissionMachine.TestCase
