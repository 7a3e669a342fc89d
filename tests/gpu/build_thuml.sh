#!/usr/bin/env bash
# Builds thu-ml SageAttention's Hopper path (the sm90 attention kernels and the fused
# quantizers; what `sageattn` dispatches to on sm_90) in place, for the benchmarks' thu-ml
# columns on a device without network access. Its source tree is not part of this repo: fetch
# it (github:thu-ml/SageAttention) into an ignored folder and carry it.
#
#   bash tests/gpu/build_thuml.sh .thirdparty/SageAttention && export PYTHONPATH=.thirdparty/SageAttention
set -euo pipefail
SRC=$(cd "$1" && pwd)
cd "$SRC"
cat > /tmp/build_thuml_setup.py <<'PY'
import os
import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
cxx = ["-O3", "-std=c++17", "-DENABLE_BF16", abi]
nvcc = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "--use_fast_math",
        "--threads=8", "-diag-suppress=174", abi, "-gencode", "arch=compute_90a,code=sm_90a"]
exts = {
    "qattn": CUDAExtension("sageattention._qattn_sm90",
                           ["csrc/qattn/pybind_sm90.cpp", "csrc/qattn/qk_int_sv_f8_cuda_sm90.cu"],
                           extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-lcuda"]),
    "fused": CUDAExtension("sageattention._fused", ["csrc/fused/pybind.cpp", "csrc/fused/fused.cu"],
                           extra_compile_args={"cxx": cxx, "nvcc": nvcc}),
}
setup(name="sageattention", ext_modules=[exts[os.environ["THUML_EXT"]]], cmdclass={"build_ext": BuildExtension})
PY
# The two extensions in parallel, each in its own build dir (one shared dir races).
for ext in qattn fused; do
  THUML_EXT=$ext MAX_JOBS=${MAX_JOBS:-8} python3 /tmp/build_thuml_setup.py build_ext --inplace \
    --build-temp "/tmp/thuml_build_$ext" > "/tmp/thuml_build_$ext.log" 2>&1 &
done
wait
cat /tmp/thuml_build_qattn.log /tmp/thuml_build_fused.log | tail -5
PYTHONPATH=$SRC python3 -c "import sageattention, sageattention.sm90_compile, sageattention.quant; print('thu-ml sageattention built:', sageattention.__file__)"
