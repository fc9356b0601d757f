"""CPU-CI checks of the CUDA kernel sources (no GPU needed).

* nvcc (when on PATH) compiles every ``kernels/*.cu`` for sm_90 with warnings as errors and
  the PTX must contain every entry point ``cupy_ops`` launches.
* NVRTC (when CuPy and its NVRTC library load) compiles the same text the way
  ``cupy.RawModule`` does at run time, so header or dialect problems show up here too.
* ``commtrain.compress`` imports and runs on the torch kernels when CuPy is absent.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KDIR = Path(__file__).resolve().parents[1] / "commtrain" / "compress" / "kernels"
SOURCES = sorted(KDIR.glob("*.cu"))
SUFFIXES = ("f32", "f16", "bf16")
# Every kernel name cupy_ops launches, per source file.
ENTRIES = {
    "grouped": [f"grouped_{k}_{s}" for k in ("stats", "encode", "fused") for s in SUFFIXES] + ["grouped_decode"],
    "natural": [f"natural_{k}_{s}" for k in ("amax", "encode") for s in SUFFIXES] + ["natural_decode"],
    "sparse": [f"sparse_pack_{s}" for s in SUFFIXES],
}


def test_every_source_is_known():
    assert sorted(p.stem for p in SOURCES) == sorted(ENTRIES)
    text = (KDIR / "cupy_ops.py").read_text()
    for name in ENTRIES:
        assert f'"{name}"' in text, f"cupy_ops never loads {name}.cu"


def test_fused_tile_constant_matches_source():
    src = (KDIR / "grouped.cu").read_text()
    threads = int(re.search(r"#define FUSED_THREADS (\d+)", src).group(1))
    ch = int(re.search(r"#define FUSED_CH (\d+)", src).group(1))
    ops = (KDIR / "cupy_ops.py").read_text()
    assert int(re.search(r"_FUSED_TILE = (\d+)", ops).group(1)) == threads * 8 * ch
    assert int(re.search(r"_THREADS = (\d+)", ops).group(1)) == threads


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: CUDA sources not compiled")
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(src, tmp_path):
    ptx = tmp_path / (src.stem + ".ptx")
    cmd = ["nvcc", "-arch=sm_90", "-std=c++14", f"-I{KDIR}", "-Werror", "all-warnings", "--ptx", str(src), "-o",
           str(ptx)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    text = ptx.read_text()
    for name in ENTRIES[src.stem]:
        assert re.search(rf"\.entry {name}\(", text), f"{name} missing from {src.name}"
    # The object file too (ptxas: register allocation, resource limits).
    r = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++14", f"-I{KDIR}", "-c", str(src), "-o",
                        str(tmp_path / (src.stem + ".o"))], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception as e:  # no CuPy, or no NVRTC shared library
        pytest.skip(f"CuPy's NVRTC is not loadable here ({type(e).__name__}: {e})")


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvrtc_compiles(src):
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(src.read_text(), src.name, [], [])
    try:
        nvrtc.compileProgram(prog, ["--std=c++14", f"-I{KDIR}", "-arch=compute_90"])
    except Exception as e:
        pytest.fail(f"NVRTC failed on {src.name}: {e}\n{nvrtc.getProgramLog(prog)}")
    ptx = nvrtc.getPTX(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for name in ENTRIES[src.stem]:
        assert f".entry {name}(" in ptx


def test_compress_imports_and_runs_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None\n"  # makes `import cupy` raise ImportError
        "import torch\n"
        "from commtrain.compress import build_codec\n"
        "from commtrain.compress.kernels import backend_name, cupy_available, resolve, torch_ops\n"
        "assert not cupy_available()\n"
        "assert resolve('auto', 'cpu') is torch_ops and backend_name('auto', 'cpu') == 'torch'\n"
        "c = build_codec('quant:bits=4,rounding=nearest')\n"
        "x = torch.randn(1000)\n"
        "assert (c.decompress(c.compress(x)) - x).abs().max() < 0.5\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=KDIR.parents[2])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
