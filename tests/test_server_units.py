"""Server pieces without Flower's engine: FedAvg, the run folder, the privacy tracker."""

import numpy as np
import pytest

from common.federation import WireEntry
from common.results import ROUND_COLUMNS
from server.aggregate import weighted_average
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
