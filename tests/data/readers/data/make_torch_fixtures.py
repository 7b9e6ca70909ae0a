"""Regenerates the real torch / PyG pickles used by test_pyg_pickle.py.

Run with an environment that has torch and torch_geometric (the tests themselves
need neither):  python tests/data/readers/data/make_torch_fixtures.py
Made with torch 2.13.0+cpu and torch_geometric 2.8.1. Values are deterministic
(see test_pyg_pickle.py for the expected ones).
"""

import pickle
from pathlib import Path

import torch
from torch_geometric.data import Data

HERE = Path(__file__).parent


def oc20_like():
    base = torch.arange(12, dtype=torch.float32).reshape(4, 3) * 0.5
    return Data(
        pos=base[1:],  # a view with a storage offset
        cell=(torch.eye(3) * 8.0).unsqueeze(0),
        atomic_numbers=torch.tensor([8.0, 1.0, 1.0]),
        natoms=3,
        tags=torch.tensor([0, 1, 2]),
        fixed=torch.tensor([1.0, 0.0, 0.0]),
        sid=7,
        fid=2,
        y=-1.25,
        force=torch.full((3, 3), 0.25),
        y64=torch.tensor(2.5, dtype=torch.float64),
        flags=torch.tensor([True, False]),
        half=torch.tensor([1.5], dtype=torch.float16),
        i32=torch.tensor([7], dtype=torch.int32),
    )


def ani1x_like():
    return Data(
        pos=torch.tensor(
            [
                [0.0, 0.0, 0.0],
                [0.63, 0.63, 0.63],
                [-0.63, -0.63, 0.63],
                [-0.63, 0.63, -0.63],
                [0.63, -0.63, -0.63],
            ]
        ),
        atomic_numbers=torch.Tensor([6, 1, 1, 1, 1]),
        sid=11,
        fid=4,
        natoms=5,
        tags=torch.LongTensor([2, 2, 2, 2, 2]),
        force=torch.tensor([[0.0, 0.0, 0.0]] * 4 + [[0.5, -0.5, 0.25]]),
        pbc=torch.Tensor([False, False, False]),
        y=-1102.5,
    )


def pyg1_like():
    d = Data.__new__(Data)
    object.__getattribute__(d, "__dict__").update(
        {
            "x": None,
            "edge_index": None,
            "pos": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
            "atomic_numbers": torch.tensor([26.0, 8.0]),
            "cell": torch.eye(3).unsqueeze(0) * 4.0,
            "y": -3.5,
            "force": torch.tensor([[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]]),
            "tags": torch.tensor([1, 2]),
            "fixed": torch.tensor([0.0, 0.0]),
            "natoms": 2,
            "sid": 5,
            "__num_nodes__": None,
        }
    )
    return d


if __name__ == "__main__":
    (HERE / "pyg2_oc20_protocol4.pkl").write_bytes(pickle.dumps(oc20_like()))
    (HERE / "pyg2_oc20_protocol2.pkl").write_bytes(pickle.dumps(oc20_like(), protocol=2))
    (HERE / "pyg2_ani1x_protocol5.pkl").write_bytes(pickle.dumps(ani1x_like(), protocol=-1))
    (HERE / "pyg1_oc20_protocol4.pkl").write_bytes(pickle.dumps(pyg1_like()))
    qm9 = [
        {
            "z": torch.tensor([6, 1, 1, 1, 1]),
            "pos": torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.09]] + [[1.0, 0.0, -0.36]] * 3),
            "y": torch.arange(19, dtype=torch.float32).reshape(1, 19) - 3.0,
            "name": "gdb_1",
            "idx": torch.tensor([0]),
        },
        {
            "z": torch.tensor([7, 1, 1, 1]),
            "pos": torch.zeros(4, 3) + 0.5,
            "y": torch.arange(19, dtype=torch.float32).reshape(1, 19) * 0.5,
            "name": "gdb_2",
            "idx": torch.tensor([1]),
        },
    ]
    torch.save(qm9, HERE / "qm9_v3_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(qm9, HERE / "qm9_v3_zip.pt")
