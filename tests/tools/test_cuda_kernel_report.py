"""scripts/cuda_kernel_report.py's reading of SASS and its occupancy arithmetic, on synthetic
input (the report itself needs a CUDA build and cuobjdump, which CI does not install)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location(
    "cuda_kernel_report", os.path.join(ROOT, "scripts", "cuda_kernel_report.py")
)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _sass(lines):
    return [(0x10 * i, t) for i, t in enumerate(lines)]


def test_main_loop_is_the_inner_loop_with_the_most_hmma():
    body = _sass(
        [
            "MOV R1, c[0x0][0x28]",  # 0x00
            "LDG.E R2, desc[UR4][R4.64]",  # 0x10: outer loop starts
            "LDSM.16.M88.4 R8, [R3]",  # 0x20: inner loop starts
            "HMMA.16816.F32.BF16 R12, R8, R10, R12",
            "HMMA.16816.F32.BF16 R16, R8, R10, R16",
            "MUFU.EX2 R5, R5",
            "NOP",
            "@P0 BRA 0x20",  # 0x70: inner back-edge
            "FADD R6, R6, R7",
            "@!P1 BRA 0x10",  # 0x90: outer back-edge
            "EXIT",
            "BRA 0xa0",  # the self-loop after EXIT: no HMMA
        ]
    )
    whole, loop = report.analyse(body)
    assert whole["hmma"] == 2 and whole["mufu"] == 1 and whole["instr"] == 11  # the NOP not counted
    # inner loop 0x20..0x70: LDSM, 2 HMMA, MUFU, BRA (the NOP dropped)
    assert loop["instr"] == 5 and loop["hmma"] == 2 and loop["lds"] == 1 and loop["ldg"] == 0
    assert loop["non_mma_per_hmma"] == 1.5


def test_without_hmma_the_loop_with_the_most_global_loads():
    body = _sass(["LDG.E R1, [R2]", "LDG.E R3, [R4]", "BRA 0x0", "IADD3 R1, R1, 1, RZ", "BRA 0x30"])
    _, loop = report.analyse(body)
    assert loop["ldg"] == 2 and loop["hmma"] == 0 and loop["non_mma_per_hmma"] is None


def test_blocks_per_sm():
    # 128 threads at 128 registers: 4 warps x 4096 registers = 16384 per block -> 4 blocks
    assert report.blocks_per_sm(128, 128, 0) == 4
    # 255 registers round up to 256 per thread (granule of 256 per warp): 2 blocks of 4 warps
    assert report.blocks_per_sm(255, 128, 0) == 2
    # few registers: the 32-block limit, then the 64-warp limit
    assert report.blocks_per_sm(16, 32, 0) == 32
    assert report.blocks_per_sm(16, 1024, 0) == 2
    # static shared memory (plus 1 KiB reserved per block) of 100 KiB: 2 blocks in 228 KiB
    assert report.blocks_per_sm(32, 128, 100 * 1024) == 2


def test_short_name_drops_namespaces_and_parameters():
    mangled = (
        "_ZN14flash_attn_ext4cuda10mma_detail28attention_grad_kv_mma_kernelI6__halfLi128EEEvNS0_17MmaBackwardParamsE"
    )
    name = report.short_name(mangled)
    assert name in ("attention_grad_kv_mma_kernel<__half, 128>", mangled)  # mangled where c++filt is missing
