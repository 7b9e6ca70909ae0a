"""Regenerate `torch_objects.pt` / `torch_objects_legacy.pt` / `torch_objects_expected.npz` (needs torch).

    python tests/torchfile/data/make_torch_fixture.py

Genuine `torch.save` output, so that the reader is tested against real PyTorch
files even where torch is not installed. The expected arrays are torch's own
`.numpy()` values (bfloat16 / float8 as raw bits).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def build():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7 - 1
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(6, dtype=torch.float32).reshape(2, 3) / 3)
        lin.bias.copy_(torch.tensor([0.25, -0.5]))
    c = torch.complex(base[:2, :3], -base[2:, :3])
    tensors = OrderedDict(
        f32=base,
        f32_t=base.t(),  # shares base's storage, transposed
        f32_slice=base[1:3, ::2],  # storage offset and strides
        f32_expand=torch.arange(3, dtype=torch.float32).expand(2, 3),  # stride 0
        f64=base.double(),
        f16=base.half(),
        bf16=base.bfloat16(),
        i64=torch.arange(-5, 5),
        i32=torch.arange(-3, 3, dtype=torch.int32),
        i16=torch.arange(-3, 3, dtype=torch.int16),
        i8=torch.arange(-3, 3, dtype=torch.int8),
        u8=torch.arange(250, 256, dtype=torch.uint8),
        bool=torch.arange(6) % 3 == 0,
        c64=c,
        c128=c.to(torch.complex128),
        conj=c.conj(),  # lazy conjugate bit
        u16=torch.arange(65530, 65536, dtype=torch.int32).to(torch.uint16),  # _rebuild_tensor_v3
        f8e4m3=torch.tensor([0.5, -1.0, 2.0, 448.0, 0.0]).to(torch.float8_e4m3fn),
        f8e5m2=torch.tensor([0.5, -1.0, 2.0, 57344.0, 0.0]).to(torch.float8_e5m2),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(base[0].clone()),
    )
    obj = {
        "tensors": tensors,
        "tied": tensors["f32"],  # the same tensor object again
        "module_state": lin.state_dict(),  # OrderedDict with a _metadata attribute
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "np_scalar": np.float64(2.5),
        "np_array": np.arange(4, dtype=np.int16),
        "set": {1, 2},
        "bytes": b"\x00\xff",
        "nested": [(1, 2.5, None, True, "text")],
    }
    return obj


def expected(obj):
    out = {}
    for k, t in obj["tensors"].items():
        t = t.detach().resolve_conj()
        if t.dtype == torch.bfloat16:
            out[k] = t.view(torch.int16).numpy()
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            out[k] = t.view(torch.uint8).numpy()
        else:
            out[k] = t.numpy()
    for k, t in obj["module_state"].items():
        out["module_state." + k] = t.numpy()
    return out


def main():
    torch.manual_seed(0)
    obj = build()
    torch.save(obj, HERE / "torch_objects.pt")
    np.savez(HERE / "torch_objects_expected.npz", **expected(obj))
    # the same objects in the legacy (pre-1.6, non-zip) format
    torch.save(obj, HERE / "torch_objects_legacy.pt", _use_new_zipfile_serialization=False)
    print("torch", torch.__version__)


if __name__ == "__main__":
    main()
