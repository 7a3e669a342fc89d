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
import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
cxx = ["-O3", "-std=c++17", "-DENABLE_BF16", abi]
nvcc = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "--use_fast_math",
        "--threads=8", "-diag-suppress=174", abi, "-gencode", "arch=compute_90a,code=sm_90a"]
setup(name="sageattention", ext_modules=[
    CUDAExtension("sageattention._qattn_sm90", ["csrc/qattn/pybind_sm90.cpp", "csrc/qattn/qk_int_sv_f8_cuda_sm90.cu"],
                  extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-lcuda"]),
    CUDAExtension("sageattention._fused", ["csrc/fused/pybind.cpp", "csrc/fused/fused.cu"],
                  extra_compile_args={"cxx": cxx, "nvcc": nvcc}),
], cmdclass={"build_ext": BuildExtension})
PY
MAX_JOBS=${MAX_JOBS:-16} python3 /tmp/build_thuml_setup.py build_ext --inplace
PYTHONPATH=$SRC python3 -c "import sageattention, sageattention.sm90_compile, sageattention.quant; print('thu-ml sageattention built:', sageattention.__file__)"
