"""Static metrics of every CUDA kernel in the built extension, read from its sm_90 machine code
(no GPU needed): registers, stack (spills), static shared memory, the launch bound, blocks per SM
as registers, threads and static shared memory allow, and the SASS instruction mix of the whole
kernel and of its main loop (the innermost loop with the most HMMA, or without HMMA the loop with
the most global loads, the shortest when they nest):
instructions, HMMA, non-MMA instructions per HMMA, MUFU, shared-memory loads/stores. Exits 1 when
any kernel uses stack or local memory (a spill or a local array), so a change that spills fails.

    pip install --target /tmp/cudatools nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm   # once
    python scripts/cuda_kernel_report.py --tools /tmp/cudatools/nvidia/cu13/bin [--filter mma] [--csv k.csv]

Not read here: dynamic shared memory (set at launch) and anything dynamic (trip counts, stalls):
blocks per SM is an upper bound for kernels that take dynamic shared memory.
"""

import argparse
import csv
import glob
import os
import re
import shutil
import subprocess
import sys

# sm_90 (H100 / H200) limits per SM.
REGS_PER_SM, MAX_WARPS, MAX_BLOCKS, SMEM_PER_SM, REG_GRANULE = 65536, 64, 32, 228 * 1024, 256


def tool(name, tools):
    for d in ([tools] if tools else []) + os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    sys.exit(f"{name} not found: pip install --target DIR nvidia-cuda-cuobjdump and pass --tools DIR/nvidia/cu13/bin")


def short_name(mangled):
    """'attention_forward_mma_kernel<c10::BFloat16, 128>' from the mangled symbol."""
    cxxfilt = shutil.which("c++filt")
    name = mangled
    if cxxfilt:
        name = subprocess.run([cxxfilt, mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = re.sub(r"flash_attn_ext::|cuda::|mma_detail::|\(anonymous namespace\)::|at::native::", "", name)
    name = re.sub(r"\(.*\)$", "", name)  # parameters
    return re.sub(r"^void ", "", name)


def resource_usage(cuobjdump, lib):
    text = subprocess.run([cuobjdump, "--dump-resource-usage", lib], capture_output=True, text=True).stdout
    usage, fn = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
        elif fn and "REG:" in line:
            usage[fn] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line) if not k.startswith("CONSTANT")}
            fn = None
    return usage


def launch_bounds(cuobjdump, lib):
    """Per kernel, EIATTR_MAX_THREADS (__launch_bounds__) when the kernel declares one."""
    text = subprocess.run([cuobjdump, "-elf", lib], capture_output=True, text=True).stdout
    bounds, fn, want = {}, None, False
    for line in text.splitlines():
        if line.startswith(".nv.info."):
            fn, want = line[len(".nv.info.") :].strip(), False
        elif fn and "EIATTR_MAX_THREADS" in line:
            want = True
        elif want and line.strip().startswith("Value:"):
            x, y, z = (int(v, 16) for v in line.split()[1:4])
            bounds[fn] = x * y * z
            want = False
    return bounds


def sass_metrics(cuobjdump, lib):
    text = subprocess.run([cuobjdump, "-sass", lib], capture_output=True, text=True).stdout
    kernels, fn, body = {}, None, []

    def close():
        if fn is not None:
            kernels[fn] = analyse(body)

    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            close()
            fn, body = m.group(1), []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if fn is not None and m:
            body.append((int(m.group(1), 16), m.group(2).strip()))
    close()
    return kernels


def counts(instrs):
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for _, t in instrs]
    ops = [o for o in ops if o != "NOP"]
    c = {
        "instr": len(ops),
        "hmma": sum(o.startswith(("HMMA", "HGMMA")) for o in ops),
        "mufu": sum(o.startswith("MUFU") for o in ops),
        "lds": sum(o.startswith(("LDS", "LDSM")) for o in ops),
        "sts": sum(o.startswith("STS") for o in ops),
        "ldg": sum(o.startswith(("LDG", "LDGSTS")) for o in ops),
    }
    c["non_mma_per_hmma"] = round((c["instr"] - c["hmma"]) / c["hmma"], 2) if c["hmma"] else None
    return c


def analyse(body):
    whole = counts(body)
    # Loops: a branch to an earlier address closes one. The main loop is the innermost loop with
    # the most HMMA: one that holds no other HMMA loop (the forward's interior phase is a loop
    # inside the loop that also runs the masked edge tiles; the inner one is the hot path).
    loops = []
    for addr, text in body:
        m = re.search(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            loops.append((lo, addr, counts([(a, t) for a, t in body if lo <= a <= addr])))
    innermost = [
        c
        for lo, hi, c in loops
        if c["hmma"]
        and not any(m["hmma"] and lo <= mlo and mhi <= hi and (mlo, mhi) != (lo, hi) for mlo, mhi, m in loops)
    ]
    if innermost:
        return whole, max(innermost, key=lambda c: (c["hmma"], -c["instr"]))
    # A kernel without HMMA (decode, row programs): the loop with the most global loads.
    main = max((c for _, _, c in loops), key=lambda c: (c["ldg"], -c["instr"]), default=None)
    return whole, main


def blocks_per_sm(regs, threads, smem):
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // REG_GRANULE) * REG_GRANULE
    by_regs = REGS_PER_SM // max(1, regs_per_warp * warps)
    by_smem = SMEM_PER_SM // (smem + 1024) if smem else MAX_BLOCKS
    return min(by_regs, MAX_WARPS // warps, MAX_BLOCKS, by_smem)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lib", nargs="?", help="the built extension (default: flash_attn_ext/_C*.so)")
    ap.add_argument("--tools", help="folder holding cuobjdump")
    ap.add_argument("--filter", default="", help="only kernels whose name matches this regex")
    ap.add_argument("--csv")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lib = a.lib or (sorted(glob.glob(os.path.join(root, "flash_attn_ext", "_C*.so"))) or [None])[0]
    if lib is None:
        sys.exit("no built extension: build with FLASH_ATTN_EXT_CUDA=1 first, or name the library")
    cuobjdump = tool("cuobjdump", a.tools)
    usage, bounds, sass = resource_usage(cuobjdump, lib), launch_bounds(cuobjdump, lib), sass_metrics(cuobjdump, lib)
    if not usage:
        sys.exit(f"{lib} holds no sm_90 machine code (built without CUDA?)")
    rows = []
    for fn, u in usage.items():
        name = short_name(fn)
        if a.filter and not re.search(a.filter, name):
            continue
        whole, loop = sass.get(fn, (counts([]), None))
        threads = bounds.get(fn)
        rows.append(
            dict(
                kernel=name,
                regs=u.get("REG", 0),
                stack=u.get("STACK", 0),
                local=u.get("LOCAL", 0),
                smem_static=u.get("SHARED", 0),
                threads=threads or "",
                blocks_per_sm=blocks_per_sm(u.get("REG", 0), threads, u.get("SHARED", 0)) if threads else "",
                instr=whole["instr"],
                hmma=whole["hmma"],
                mufu=whole["mufu"],
                loop_instr=loop["instr"] if loop else "",
                loop_hmma=loop["hmma"] if loop else "",
                loop_non_mma_per_hmma=(loop["non_mma_per_hmma"] if loop else "") or "",
                loop_mufu=loop["mufu"] if loop else "",
                loop_lds=loop["lds"] if loop else "",
                loop_ldg=loop["ldg"] if loop else "",
            )
        )
    rows.sort(key=lambda r: r["kernel"])
    print(f"{lib}: {len(rows)} kernels (sm_90)")
    head = (
        f"{'kernel':64} {'reg':>4} {'stk':>4} {'smem':>6} {'thr':>4} {'blk/SM':>6} {'instr':>6} {'HMMA':>5} "
        f"| loop: {'instr':>5} {'HMMA':>5} {'nonMMA/HMMA':>11} {'MUFU':>5} {'LDS':>4} {'LDG':>4}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['kernel'][:64]:64} {r['regs']:>4} {r['stack']:>4} {r['smem_static']:>6} {r['threads']!s:>4} "
            f"{r['blocks_per_sm']!s:>6} {r['instr']:>6} {r['hmma']:>5} | {r['loop_instr']!s:>11} {r['loop_hmma']!s:>5} "
            f"{r['loop_non_mma_per_hmma']!s:>11} {r['loop_mufu']!s:>5} {r['loop_lds']!s:>4} {r['loop_ldg']!s:>4}"
        )
    if a.csv and rows:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {a.csv}")
    spills = [r["kernel"] for r in rows if r["stack"] or r["local"]]
    if spills:
        print(f"stack or local memory (spills) in {len(spills)} kernel(s): " + "; ".join(spills))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
