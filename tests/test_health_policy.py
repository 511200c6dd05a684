"""Drive health: the SMART log decoded, failure thresholds named, the storm guard held."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.emulated.model import structures
from agent.nvme import spec
from agent.nvme.smart import SmartLogError, parse_smart_log, warning_names
from cluster.records import DriveHealth, NodeRecord
from orchestrator.health_policy import HealthPolicy, automatic_evacuations, failing, failing_reasons


def page(**values: int) -> bytes:
    return structures.smart_log(structures.Health(**values), over_threshold_k=343, under_threshold_k=0,
                                error_log_entries=0)


@given(st.integers(0, 0xFFFF), st.integers(0, 100), st.integers(0, 100), st.integers(0, 255),
       st.integers(0, 1 << 40))
def test_the_log_the_model_encodes_decodes_to_the_same_values(temp: int, spare: int, threshold: int, used: int,
                                                              media: int) -> None:
    got = parse_smart_log(page(temperature_k=temp, available_spare=spare, available_spare_threshold=threshold,
                               percentage_used=used, media_errors=media))
    assert (got.temperature_k, got.available_spare, got.available_spare_threshold, got.percentage_used,
            got.media_errors) == (temp, spare, threshold, used, media)
    # the model computes the spare and temperature bits from the values, as a drive does
    assert bool(got.critical_warning & spec.CRITICAL_WARNING_SPARE) == (spare < threshold)
    assert bool(got.critical_warning & spec.CRITICAL_WARNING_TEMPERATURE) == (temp > 343)


def test_a_short_page_is_refused() -> None:
    with pytest.raises(SmartLogError, match="is 100 bytes; it has 512"):
        parse_smart_log(bytes(100))


def test_warning_bits_are_named() -> None:
    assert warning_names(spec.CRITICAL_WARNING_RELIABILITY | spec.CRITICAL_WARNING_READ_ONLY | 0x80) == [
        "reliability degraded (media or internal errors)", "media placed in read-only mode", "critical warning bit 7"]


def test_a_healthy_drive_has_no_reasons_and_each_signal_names_itself() -> None:
    policy = HealthPolicy()
    healthy = DriveHealth(temperature_k=310, available_spare=100, available_spare_threshold=10)
    assert failing_reasons(healthy, policy) == []
    assert failing_reasons(None, policy) == []
    cases = {
        "critical warning: reliability degraded": DriveHealth(critical_warning=spec.CRITICAL_WARNING_RELIABILITY,
                                                              available_spare_threshold=10),
        "available spare 9% at or below its threshold 10%": DriveHealth(available_spare=9,
                                                                         available_spare_threshold=10),
        "101% of its rated endurance used (limit 100%)": DriveHealth(percentage_used=101),
        "3 media errors (limit 0)": DriveHealth(media_errors=3),
        "temperature 360 K above 358 K": DriveHealth(temperature_k=360),
    }
    for expected, health in cases.items():
        reasons = failing_reasons(health, policy)
        assert len(reasons) == 1 and reasons[0].startswith(expected), reasons


def node(name: str, health: DriveHealth | None) -> NodeRecord:
    return NodeRecord(name=name, address="a", data_address="d", capacity_bytes=1 << 30, health=health)


def test_the_storm_guard_starts_at_most_k_and_holds_the_rest_back() -> None:
    worn = DriveHealth(percentage_used=120)
    worse = DriveHealth(percentage_used=120, media_errors=5)
    nodes = [node("n1", worn), node("n2", worse), node("n3", DriveHealth()), node("n4", worn)]
    policy = HealthPolicy(max_automatic=2)
    triggers = automatic_evacuations(nodes, policy, evacuating_automatically=(), evacuating=())
    assert [name for name, _ in triggers.start] == ["n2", "n1"]  # worst first, then by name
    assert [name for name, _ in triggers.held_back] == ["n4"]
    # one already evacuating automatically takes a place; nodes evacuating are not started again
    later = automatic_evacuations(nodes, policy, evacuating_automatically={"n2"}, evacuating={"n2"})
    assert [name for name, _ in later.start] == ["n1"] and [name for name, _ in later.held_back] == ["n4"]
    assert failing(nodes, policy) == {"n1", "n2", "n4"}


def test_a_node_record_keeps_its_health_through_etcd_bytes() -> None:
    record = node("n1", DriveHealth(critical_warning=4, temperature_k=300, media_errors=2))
    assert NodeRecord.from_bytes(record.to_bytes()) == record
    older = NodeRecord.from_bytes(b'{"name": "n1", "address": "a", "data_address": "d", "capacity_bytes": 1}')
    assert older.health is None
