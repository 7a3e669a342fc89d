#!/usr/bin/env bash
# Builds thu-ml SageAttention in place for the benchmarks' thu-ml columns on a device without
# network access: its Hopper path (the sm90 attention kernels, what `sageattn` dispatches to on
# sm_90), the fused quantizers, and its sm80 mma.sync kernel with FP16 PV and fp32 accumulation
# (`sageattn_qk_int8_pv_fp16_cuda(pv_accum_dtype="fp32")`, the kernel RTX 30 cards and our
# mma family are compared with). Its source tree is not part of this repo: fetch it
# (github:thu-ml/SageAttention) into an ignored folder and carry it.
#
#   bash tests/gpu/build_thuml.sh .thirdparty/SageAttention && export PYTHONPATH=.thirdparty/SageAttention
#
# The sm80 extension is built from a copy of its kernel file cut after the fp32-accumulation
# host function (the other three accumulation variants are not compiled), with a binding of that
# one function, and nvcc --split-compile: the whole file serially takes far longer than the
# 4 minutes a device run can spend on it. THUML_EXTS picks the extensions (default all three:
# "qattn fused sm80"; qattn is the sm90 one).
set -euo pipefail
SRC=$(cd "$1" && pwd)
cd "$SRC"
GEN=/tmp/thuml_sm80_src
mkdir -p "$GEN"
python3 - "$SRC" "$GEN" <<'PY'
import sys
from pathlib import Path
src, gen = Path(sys.argv[1]), Path(sys.argv[2])
qattn = src / "csrc" / "qattn"
text = (qattn / "qk_int_sv_f16_cuda_sm80.cu").read_text()
cut = text.index("torch::Tensor qk_int8_sv_f16_accum_f16_attn(")
text = text[:cut].replace('#include "', f'#include "{qattn}/')
(gen / "sm80_accum_f32.cu").write_text(text)
header = (qattn / "attn_cuda_sm80.h").read_text()
decl = header[header.index("torch::Tensor qk_int8_sv_f16_accum_f32_attn("):]
decl = decl[: decl.index(";") + 1]
(gen / "pybind_sm80_f32.cpp").write_text(
    "#include <pybind11/pybind11.h>\n#include <torch/extension.h>\n" + decl + "\n"
    "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
    '  m.def("qk_int8_sv_f16_accum_f32_attn", &qk_int8_sv_f16_accum_f32_attn, "QK int8 sv f16 accum f32 attn");\n}\n')
PY
cat > /tmp/build_thuml_setup.py <<PY
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
    "sm80": CUDAExtension("sageattention._qattn_sm80",
                          ["$GEN/pybind_sm80_f32.cpp", "$GEN/sm80_accum_f32.cu"],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc + ["--split-compile=16"]}),
}
setup(name="sageattention", ext_modules=[exts[os.environ["THUML_EXT"]]], cmdclass={"build_ext": BuildExtension})
PY
EXTS=${THUML_EXTS:-qattn fused sm80}
# The extensions in parallel, each in its own build dir (one shared dir races).
pids=()
for ext in $EXTS; do
  THUML_EXT=$ext MAX_JOBS=${MAX_JOBS:-8} python3 /tmp/build_thuml_setup.py build_ext --inplace \
    --build-temp "/tmp/thuml_build_$ext" > "/tmp/thuml_build_$ext.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { status=1; echo "thu-ml build FAILED: $(echo $EXTS | cut -d' ' -f$((i + 1)))"; }
done
for ext in $EXTS; do tail -3 "/tmp/thuml_build_$ext.log"; done
[ $status = 0 ] || exit 1
PYTHONPATH=$SRC python3 -c "import sageattention, sageattention.quant; print('thu-ml sageattention built:', sageattention.__file__)"
case " $EXTS " in *" qattn "*) PYTHONPATH=$SRC python3 -c "import sageattention.sm90_compile; print('thu-ml sm90 kernel built')";; esac
case " $EXTS " in *" sm80 "*) PYTHONPATH=$SRC python3 -c "import sageattention.sm80_compile; print('thu-ml sm80 kernel built')";; esac
