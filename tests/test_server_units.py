"""Server pieces without Flower's engine: FedAvg, the run folder, the privacy tracker."""

import numpy as np
import pytest

from common.federation import WireEntry
from common.results import ROUND_COLUMNS
from server.aggregate import average_by_site, weighted_average
from server.run_folder import RunFolder


def test_weighted_average_matches_hand_computation():
    states = [
        {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)},
        {"w": np.array([3.0, 6.0], dtype=np.float32), "b": np.array([4.0], dtype=np.float32)},
    ]
    averaged = weighted_average(states, [1, 3])
    np.testing.assert_allclose(averaged["w"], [2.5, 5.0])
    np.testing.assert_allclose(averaged["b"], [3.0])
    assert averaged["w"].dtype == np.float32


def test_weighted_average_rejects_mismatched_states():
    with pytest.raises(ValueError, match="array 'w' has shape"):
        weighted_average([{"w": np.zeros(2)}, {"w": np.zeros(3)}], [1, 1])
    with pytest.raises(ValueError, match="state 1 has no array 'w'"):
        weighted_average([{"w": np.zeros(2)}, {"v": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([{"w": np.zeros(2)}], [0])


def test_average_by_site_ignores_reply_order():
    # Three float32 weights whose float64 average rounds to another float32 when the
    # second and third site are summed in the other order.
    values = np.array([-0.47637674, 0.03601503, -0.051089294], dtype=np.float32)
    states = [{"w": values[[site]]} for site in range(3)]
    weights = [5.0, 7.0, 11.0]
    in_order = weighted_average(states, weights)
    swapped = weighted_average([states[0], states[2], states[1]], [weights[0], weights[2], weights[1]])
    assert in_order["w"].tobytes() != swapped["w"].tobytes()
    by_site = average_by_site([0, 2, 1], [states[0], states[2], states[1]], [weights[0], weights[2], weights[1]])
    assert by_site["w"].tobytes() == in_order["w"].tobytes()


def test_sample_nodes_follows_sites_not_ids():
    from common.config import RunConfig
    from server.federation import sample_nodes

    config = RunConfig(fraction_train=0.5, num_sites=6, seed=3)
    first_ids = {101: 0, 202: 1, 303: 2, 404: 3, 505: 4, 606: 5}
    second_ids = {9: 0, 5: 1, 7: 2, 3: 3, 1: 4, 8: 5}  # Flower draws new node ids each run
    for server_round in (1, 2, 3):
        sampled = [
            sorted(ids[n] for n in sample_nodes(sorted(ids), set(), config, server_round, ids))
            for ids in (first_ids, second_ids)
        ]
        assert len(sampled[0]) == 3
        assert sampled[0] == sampled[1]
    spent = {404}  # site 3's budget is spent
    again = sample_nodes(list(first_ids), spent, config, 1, first_ids)
    assert 404 not in again
    assert len(again) == 2  # half of the 5 eligible sites, rounded


def test_run_folder_rows_truncate_and_checkpoint(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.append_rows([{"server_round": 1, "site": 0, "status": "ok", "epsilon": 1.5}])
    folder.append_rows([{"server_round": 2, "site": 0, "status": "ok", "epsilon": 2.0}])
    rows = folder.read_rows()
    assert list(rows.columns) == list(ROUND_COLUMNS)
    assert rows["epsilon"].tolist() == [1.5, 2.0]
    folder.truncate_rows(1)
    assert folder.read_rows()["server_round"].tolist() == [1]

    weights = {"w": np.arange(4, dtype=np.float32)}
    folder.save_checkpoint(server_round=1, weights=weights, tracker_state={"a": 1}, node_sites={7: 0})
    state = folder.load_checkpoint()
    assert state["server_round"] == 1
    np.testing.assert_array_equal(state["weights"]["w"], weights["w"])
    assert state["tracker"] == {"a": 1}
    assert state["node_sites"] == {7: 0}
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_run_folder_unreadable_checkpoint_names_file(tmp_path):
    folder = RunFolder(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt cannot be read"):
        folder.load_checkpoint()


def _entries(rounds: int, *, sigma=1.0, q=0.05, steps=20):
    return [WireEntry(sigma, q, steps, r) for r in range(1, rounds + 1)]


def test_tracker_recomputes_epsilon_against_dp_accounting():
    import dp_accounting

    from server.tracker import SiteTracker

    tracker = SiteTracker(delta=1e-5, target_epsilon=8.0, accountant="pld")
    entries = _entries(3)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 60
    )
    expected = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(1e-5)
    epsilon, mismatch = tracker.observe_train(
        site=0, node_id=11, entries=entries, epsilon_reported=expected
    )
    assert epsilon == pytest.approx(expected, rel=1e-3)
    assert mismatch == "" or "reported epsilon" in mismatch


def test_tracker_flags_under_reported_epsilon_and_reset_ledger():
    from server.tracker import SiteTracker

    tracker = SiteTracker(delta=1e-5, target_epsilon=8.0, accountant="rdp")
    true_epsilon = tracker.epsilon_of(_entries(2))
    epsilon, mismatch = tracker.observe_train(
        site=1, node_id=5, entries=_entries(2), epsilon_reported=true_epsilon / 2
    )
    assert epsilon == pytest.approx(true_epsilon)
    assert "reported epsilon" in mismatch
    assert tracker.max_epsilon() == pytest.approx(true_epsilon)  # the larger value wins

    _, mismatch = tracker.observe_train(
        site=1, node_id=5, entries=_entries(1), epsilon_reported=tracker.epsilon_of(_entries(1))
    )
    assert "no longer starts with the 2 entries" in mismatch


def test_tracker_excludes_site_before_budget():
    from server.tracker import SiteTracker

    tracker = SiteTracker(delta=1e-5, target_epsilon=5.0, accountant="rdp")
    round_entry = WireEntry(1.0, 0.05, 20, None)
    history = []
    for server_round in range(1, 50):
        entry = WireEntry(1.0, 0.05, 20, server_round)
        history.append(entry)
        tracker.observe_train(
            site=0, node_id=3, entries=history, epsilon_reported=tracker.epsilon_of(history)
        )
        tracker.forecast_next_round(0, [round_entry])
        if tracker.excluded_nodes():
            break
    assert tracker.excluded_nodes() == {3}
    assert len(history) > 1
    assert tracker.epsilon_of(history) <= 5.0
    assert tracker.epsilon_of([*history, round_entry]) > 5.0
    assert tracker.all_spent(1)


def test_tracker_state_round_trips_and_rejects_other_delta():
    from server.tracker import SiteTracker

    tracker = SiteTracker(delta=1e-5, target_epsilon=8.0, accountant="rdp")
    tracker.observe_train(site=2, node_id=9, entries=_entries(2), epsilon_reported=0.0)
    restored = SiteTracker(delta=1e-5, target_epsilon=8.0, accountant="rdp")
    restored.load_state_dict(tracker.state_dict())
    assert restored.sites[2].entries == tracker.sites[2].entries
    assert restored.sites[2].epsilon_server == tracker.sites[2].epsilon_server
    other = SiteTracker(delta=1e-6, target_epsilon=8.0, accountant="rdp")
    with pytest.raises(ValueError, match="delta"):
        other.load_state_dict(tracker.state_dict())
