"""pgpo-bench sass: a static report of every kernel's compiled code, built here on the CPU (no GPU needed).

    python -m pgpo_bench.cli sass --vocab 152064 --tokens 4096 --dtype bfloat16 --arch 90a,80 --json r.json --md r.md

How a kernel is compiled "as a launch would": the package's own launchers (token_kl_forward, token_stats_forward, ...)
run on `meta` tensors (shapes and strides, no memory; data_ptr() is 0, so 16-byte aligned as torch's allocations
are) with `JITFunction.run` replaced by a recorder. The recorder binds the arguments with Triton's own binder for the
target, so the signature, the divisibility-by-16 hints and the constexprs are those the JIT would use, and compiles
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and the wheel's ptxas. The launchers'
device-dependent choices see the target: `device_sm_count` returns its SM count and, for autotuned kernels, every
autotune config is compiled (tagged `autotune i/n`) next to the heuristic's choice (tagged `heuristic`).

Per kernel: registers, spill bytes (ptxas -v, same flags as Triton's), shared memory, resident CTAs and warps per SM
(from registers, warps and shared memory against the arch's limits; the occupancy calculator's rules), and of the hot
loop (the innermost backward-branch loop of the SASS that loads the most global bytes): SASS instructions per
element pair (instructions in the loop / pairs its global loads bring in per thread per iteration), BAR and SHFL
counts, whether it loads with 128-bit LDG, and how many loops load global memory (each streams the rows once, so
that is the number of global reads per logit element). Every figure is static: compiled code, not a GPU measurement.

It runs in a process of its own (the CLI starts one) because TRITON_INTERPRET=1 replaces @triton.jit functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# %% arch limits ---------------------------------------------------------------------------------------------------
# Per SM, from the CUDA occupancy calculator's tables (compute capability 8.0 and 9.0). Registers are allocated per
# warp in units of 256; every CTA reserves 1 KiB of shared memory on sm_80+.
ARCH_LIMITS = {
    90: {"gpu": "H100/H200 (sm_90a)", "sms": 132, "regs": 65536, "max_warps": 64, "max_ctas": 32,
         "smem": 228 * 1024, "smem_reserved": 1024},
    80: {"gpu": "A100 (sm_80)", "sms": 108, "regs": 65536, "max_warps": 64, "max_ctas": 32,
         "smem": 164 * 1024, "smem_reserved": 1024},
}
REG_ALLOC_UNIT = 256


def occupancy(regs: int, shared: int, num_warps: int, arch: int) -> dict:
    """Resident CTAs and warps per SM for a kernel of `regs` registers/thread and `shared` bytes/CTA, and the limiter."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": (lim["regs"] // regs_per_warp) // num_warps,
        "warps": lim["max_warps"] // num_warps,
        "shared": lim["smem"] // (shared + lim["smem_reserved"]),
        "ctas": lim["max_ctas"],
    }
    ctas = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps, "limited_by": limiter}


# %% SASS parsing --------------------------------------------------------------------------------------------------
_INSTR = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_TARGET = re.compile(r"`\((\.L\w+)\)")
_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


@dataclass
class Instr:
    addr: int
    opcode: str  # with modifiers, e.g. LDG.E.128
    text: str


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """nvdisasm output -> (instructions in address order, {label: address of the instruction after it})."""
    instrs: list[Instr] = []
    pending: list[str] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())  # drop a guard predicate
        ins = Instr(int(m.group(1), 16), body.split()[0] if body else "", body)
        for name in pending:
            labels[name] = ins.addr
        pending = []
        instrs.append(ins)
    return instrs, labels


def global_load_bytes(op: str) -> int:
    """Bytes per thread a global load brings in (LDG or the cp.async LDGSTS), 0 for anything else."""
    parts = op.split(".")
    if parts[0] not in ("LDG", "LDGSTS"):
        return 0
    return next((_WIDTH[p] for p in parts[1:] if p in _WIDTH), 4)


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) instruction index of every loop, found by its backward branch; self-branches (traps) skipped."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    loops = []
    for i, ins in enumerate(instrs):
        if ins.opcode.split(".")[0] != "BRA":
            continue
        m = _TARGET.search(ins.text)
        if not m or m.group(1) not in labels:
            continue
        start = index[labels[m.group(1)]]
        if start < i:
            loops.append((start, i))
    return loops


def loop_stats(instrs: list[Instr], loop: tuple[int, int]) -> dict:
    body = instrs[loop[0]: loop[1] + 1]
    ops = [ins.opcode for ins in body]
    return {
        "instructions": len(body),
        "global_load_bytes_per_thread": sum(global_load_bytes(op) for op in ops),
        "ldg_128": any(op.startswith(("LDG", "LDGSTS")) and ".128" in op for op in ops),
        "bar": sum(op.startswith("BAR") for op in ops),
        "shfl": sum(op.startswith("SHFL") for op in ops),
        "spill_ops": sum(op.startswith(("STL", "LDL")) for op in ops),
    }


def analyze_sass(text: str, itemsize: int | None = None) -> dict:
    """Loop structure of one kernel's SASS. itemsize: bytes per logit element when the kernel streams (a, b) pairs of
    that width; then instructions per pair = loop instructions / (global bytes per thread per iteration / 2 itemsize).
    """
    instrs, labels = parse_sass(text)
    loops = find_loops(instrs, labels)
    innermost = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    stats = [loop_stats(instrs, lp) for lp in innermost]
    loading = [s for s in stats if s["global_load_bytes_per_thread"] > 0]
    out = {
        "instructions": len(instrs),
        "loops": len(loops),
        "loops_loading_global": len(loading),
        "bar_total": sum(ins.opcode.startswith("BAR") for ins in instrs),
        "shfl_total": sum(ins.opcode.startswith("SHFL") for ins in instrs),
        "spill_ops_total": sum(ins.opcode.startswith(("STL", "LDL")) for ins in instrs),
        # tensor-core instructions: HGMMA = sm_90 warpgroup MMA (wgmma), HMMA = mma.sync
        "hgmma_total": sum(ins.opcode.startswith("HGMMA") for ins in instrs),
        "hmma_total": sum(ins.opcode.startswith("HMMA") for ins in instrs),
        "hot_loop": None,
    }
    if itemsize:
        for s in loading:
            s["pairs_per_iteration"] = s["global_load_bytes_per_thread"] / (2 * itemsize)
            s["instr_per_pair"] = round(s["instructions"] / s["pairs_per_iteration"], 2)
    if stats:
        out["hot_loop"] = max(stats, key=lambda s: (s["global_load_bytes_per_thread"], s["instructions"]))
    # every loop that streams the logits, hot one first (a kernel that reads its rows twice has two)
    out["loading_loops"] = sorted(loading, key=lambda s: s is not out["hot_loop"])
    return out


# %% tools of the triton wheel -------------------------------------------------------------------------------------
def _nvidia_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found in the triton wheel ({path})")
    return path


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_nvidia_bin("nvdisasm"), "-c", f.name], check=True, capture_output=True,
                              text=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """REG, SHARED (static), LOCAL and STACK bytes of the cubin's kernel (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvidia_bin("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump -res-usage:\n{out}")
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups())))


def ptxas_spills(ptx: str, arch: int, fp_fusion: bool) -> dict:
    """Spill bytes from `ptxas -v` run with the flags Triton's make_cubin uses."""
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    return {"spill_store_bytes": int(m.group(1)) if m else None, "spill_load_bytes": int(m.group(2)) if m else None,
            "ptxas_regs": int(regs.group(1)) if regs else None}


# %% compiling a recorded launch -----------------------------------------------------------------------------------
def compile_launch(fn, args: tuple, kwargs: dict, arch: int):
    """Compile a JITFunction for `arch` exactly as `fn[grid](*args, **kwargs)` would specialize it on that GPU.

    Returns (compiled kernel, {signature, constexprs, hinted args, options}).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, opts, bound, specialization, opts)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    names = fn.arg_names
    spec = {
        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
        "constexprs": {names[p[0]]: v for p, v in constexprs.items() if not isinstance(v, triton.language.dtype)},
        "divisible_by_16": [names[p[0]] for p, a in attrs.items() if ["tt.divisibility", 16] in a],
        "num_warps": options.num_warps,
        "num_stages": options.num_stages,
        "enable_fp_fusion": options.enable_fp_fusion,
    }
    return kernel, spec


def kernel_report(fn, args, kwargs, arch: int, itemsize: int | None) -> dict:
    kernel, spec = compile_launch(fn, args, kwargs, arch)
    res = resource_usage(kernel.asm["cubin"])
    spills = ptxas_spills(kernel.asm["ptx"], arch, spec["enable_fp_fusion"])
    shared = max(kernel.metadata.shared, res["static_shared"])
    sass = analyze_sass(disassemble(kernel.asm["cubin"]), itemsize)
    return {**spec, **res, **spills, "shared": shared,
            **occupancy(res["regs"], shared, spec["num_warps"], arch), "sass": sass}


# %% recording the launches of the package's launchers -------------------------------------------------------------
@contextlib.contextmanager
def recording(sms: int, autotune: bool, arch: int = 90):
    """Replace JITFunction.run / Autotuner.run by recorders; launchers see `sms` SMs of `arch`, autotuning on or off.

    Yields the list the launches are appended to: (fn, args, kwargs, grid, tag).
    """
    import importlib

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list = []
    tag = ["heuristic"]

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, grid, tag[0]))

    def autotune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        for i, config in enumerate(configs):
            tag[0] = f"autotune {i + 1}/{len(configs)}"
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        tag[0] = "heuristic"

    patches = [(JITFunction, "run", jit_run), (Autotuner, "run", autotune_run)]
    for name in list(sys.modules):
        mod = sys.modules[name]
        if name.startswith("pgpo_kernels.") and mod is not None:
            if hasattr(mod, "device_sm_count"):
                patches.append((mod, "device_sm_count", lambda device: sms))
            if hasattr(mod, "autotune_enabled"):
                patches.append((mod, "autotune_enabled", lambda device: autotune))
            if hasattr(mod, "RESIDENT_CTAS") and hasattr(mod, "resident_ctas"):  # token_kl's static occupancy table
                table = mod.RESIDENT_CTAS
                patches.append((mod, "resident_ctas", lambda kernel, device, t=table: t.get((kernel, arch // 10), 4)))
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    try:
        for obj, attr, new in patches:
            setattr(obj, attr, new)
        yield launches
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)
    importlib.invalidate_caches()


def _meta(shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def _mod(name):
    import importlib

    return importlib.import_module(name)  # pgpo_kernels re-exports functions under some module names


# Each driver calls one launcher of the package on meta tensors: (name, what, logit itemsize or None, call).
def _drive_token_kl_fwd(n, v, dtype, temperature, split_rows, hidden):
    _mod("pgpo_kernels.token_kl").token_kl_forward(_meta((n, v), dtype), _meta((n, v), dtype), temperature)


def _drive_token_kl_fwd_grad(n, v, dtype, temperature, split_rows, hidden):
    kl = _mod("pgpo_kernels.token_kl")
    if "save_stats" in kl.token_kl_forward.__code__.co_varnames:  # the forward that saves stats for the backward
        kl.token_kl_forward(_meta((n, v), dtype), _meta((n, v), dtype), temperature, save_stats=True)


def _drive_token_kl_split(n, v, dtype, temperature, split_rows, hidden):
    _mod("pgpo_kernels.token_kl").token_kl_forward(_meta((split_rows, v), dtype), _meta((split_rows, v), dtype),
                                                    temperature)


def _drive_token_kl_bwd(n, v, dtype, temperature, split_rows, hidden):
    import torch

    kl = _mod("pgpo_kernels.token_kl")
    if "stats" in kl.token_kl_backward.__code__.co_varnames:  # one read: the forward's [N, 5] row stats
        for need in ((True, True), (True, False), (False, True)):
            kl.token_kl_backward(_meta((n, v), dtype), _meta((n, v), dtype), _meta((n, 5), torch.float32),
                                 _meta((n,), torch.float32), temperature, need_grad=need)
    else:  # the two-read backward of before
        kl.token_kl_backward(_meta((n, v), dtype), _meta((n, v), dtype), _meta((n,), torch.float32), temperature)


def _drive_token_stats(rows):
    def drive(n, v, dtype, temperature, split_rows, hidden):
        import torch

        r = n if rows == "tokens" else split_rows
        _mod("pgpo_kernels.token_stats").token_stats_forward(_meta((r, v), dtype), _meta((r, v), dtype),
                                                             _meta((r,), torch.int64), temperature)
    return drive


def _drive_fused_linear(n, v, dtype, temperature, split_rows, hidden):
    import torch

    fl = _mod("pgpo_kernels.fused_linear")
    cfg = fl.fused_linear_launch_config(dtype, torch.device("cuda"))  # the GPU tiles (meta tensors are not cuda)
    fl.fused_linear_forward(_meta((n, hidden), dtype), _meta((n, hidden), dtype), _meta((v, hidden), dtype), None,
                            _meta((n,), torch.int64), temperature, config=cfg)


def _drive_fused_logp(backward, filter_eps=0.0):
    def drive(n, v, dtype, temperature, split_rows, hidden):
        import torch

        fl = _mod("pgpo_kernels.fused_logp")
        fwd, bwd = fl.logp_launch_configs(dtype, torch.device("cuda"))  # the GPU tiles (meta tensors are not cuda)
        h, w, t = _meta((n, hidden), dtype), _meta((v, hidden), dtype), _meta((n,), torch.int64)
        if not backward:
            fl.logp_forward(h, w, None, t, temperature, True, config=fwd)
        else:
            fl.logp_backward(h, w, None, t, _meta((n, 2), torch.float32), _meta((n, 2), torch.float32), temperature,
                             True, (True, True, False), config=bwd, filter_eps=filter_eps)
    return drive


def _drive_reshape(n, v, dtype, temperature, split_rows, hidden):
    import torch

    t = 2048
    _mod("pgpo_kernels.reshape").reshape_weights_forward(_meta((max(1, n // t), t), torch.float32),
                                                         _meta((max(1, n // t), t), torch.bool), None, 0.4, 1.0,
                                                         1e-6, True)


DRIVERS = {
    "token_kl_fwd": ("token_kl forward, N = tokens", _drive_token_kl_fwd, True),
    "token_kl_fwd_grad": ("token_kl forward saving row stats (inputs require grad), N = tokens",
                          _drive_token_kl_fwd_grad, True),
    "token_kl_split": ("token_kl forward, N = split rows (vocab split)", _drive_token_kl_split, True),
    "token_kl_bwd": ("token_kl backward, N = tokens", _drive_token_kl_bwd, True),
    "token_stats": ("token_stats, N = tokens", _drive_token_stats("tokens"), True),
    "token_stats_split": ("token_stats, N = split rows", _drive_token_stats("split"), True),
    "fused_linear": ("fused_linear_token_stats (targets), N = tokens", _drive_fused_linear, False),
    "fused_logp_fwd": ("fused_linear_logp forward (with entropy), N = tokens", _drive_fused_logp(False), False),
    "fused_logp_bwd": ("fused_linear_logp backward (grad hidden + weight), N = tokens", _drive_fused_logp(True),
                       False),
    "fused_logp_bwd_filter": ("fused_linear_logp backward with CCE's gradient filter (grad_filter 2**-12)",
                              _drive_fused_logp(True, 2.0**-12), False),
    "reshape": ("reshape_weights, N / 2048 sequences of 2048", _drive_reshape, False),
}


def record_launches(driver, arch: int, args) -> list:
    """Run one driver in heuristic mode and (when it has autotuned kernels) autotune mode -> unique launches."""
    import torch

    dtype = getattr(torch, args.dtype)
    seen = {}
    for autotune in (False, True):
        with recording(ARCH_LIMITS[arch]["sms"], autotune, arch) as launches:
            driver(args.tokens, args.vocab, dtype, 1.0, args.split_tokens, args.hidden)
        for fn, a, kw, grid, tag in launches:
            key = (fn.__name__, tuple(sorted((k, repr(v)) for k, v in kw.items())))
            if key not in seen:
                seen[key] = [fn, a, kw, grid, []]
            if tag not in seen[key][4]:
                seen[key][4].append(tag)
    return list(seen.values())


def run(args) -> dict:
    import torch

    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    records = []
    names = [d for d in DRIVERS if not args.kernels or any(re.search(p, d) for p in args.kernels)]
    for arch in args.arch:
        for name in names:
            what, driver, pairs = DRIVERS[name]
            try:
                launches = record_launches(driver, arch, args)
            except Exception as exc:  # a launcher that cannot run on meta tensors: report it, go on
                records.append({"driver": name, "arch": arch, "error": f"{type(exc).__name__}: {exc}"})
                continue
            done = {}
            for fn, a, kw, grid, tags in launches:
                rec = {"driver": name, "what": what, "arch": arch, "kernel": fn.__name__, "tags": tags,
                       "grid": list(grid) if isinstance(grid, (tuple, list)) else str(grid)}
                try:
                    rec.update(kernel_report(fn, a, kw, arch, itemsize if pairs else None))
                    if isinstance(grid, (tuple, list)):
                        ctas = math.prod(int(g) for g in grid)
                        rec["waves"] = round(ctas / (rec["ctas_per_sm"] * ARCH_LIMITS[arch]["sms"]), 3)
                except Exception as exc:
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                # the heuristic's launch and an autotune config that compile alike are one kernel, both tags
                key = json.dumps([rec["kernel"], rec.get("signature"), rec.get("constexprs"), rec.get("num_warps"),
                                  rec.get("num_stages"), rec["grid"]], sort_keys=True, default=str)
                if "error" not in rec and key in done:
                    done[key]["tags"] += [t for t in tags if t not in done[key]["tags"]]
                    continue
                done[key] = rec
                records.append(rec)
                if not args.quiet:
                    print(f"  sm_{arch} {name:<18} {fn.__name__:<36} {','.join(tags)}", file=sys.stderr, flush=True)
    import triton

    return {"tool": "pgpo-bench sass (static: compiled SASS, no GPU)", "triton": triton.__version__,
            "config": {"vocab": args.vocab, "tokens": args.tokens, "split_tokens": args.split_tokens,
                       "hidden": args.hidden, "dtype": args.dtype, "arch": args.arch},
            "arch_limits": {str(k): v for k, v in ARCH_LIMITS.items() if k in args.arch}, "kernels": records}


# %% report --------------------------------------------------------------------------------------------------------
def _cfg(rec) -> str:
    c = ", ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in rec.get("constexprs", {}).items()
                  if k.isupper() and k != "VEC")
    return f"{c}, w={rec.get('num_warps')}, s={rec.get('num_stages')}"


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# Static SASS report ({report['tool']})", "",
             f"V = {cfg['vocab']}, N = {cfg['tokens']} tokens (split launches: {cfg['split_tokens']} rows), "
             f"H = {cfg['hidden']}, {cfg['dtype']}, triton {report['triton']}. Compiled on the CPU for each arch "
             "as a launch at this shape would be; every figure is static (compiled code), none measured on a GPU.",
             "", "instr/pair: SASS instructions in the vocab loop per (a, b) element pair (one figure per loop that "
             "streams the logits, the hot one first); loop instr, BAR, SHFL, LDG.128: of the hot loop; reads: loops that load "
             "global memory (= global reads per logit element for the streaming kernels); warps/SM: resident, from "
             "registers, warps and shared memory.", ""]
    head = ("| arch | launch | kernel | config | tags | regs | spill st/ld B | smem B | CTAs/SM | warps/SM (limit) | "
            "instr/pair | loop instr | BAR | SHFL | LDG.128 | reads | waves | HGMMA/HMMA |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["kernels"]:
        if "error" in r:
            lines.append(f"| sm_{r['arch']} | {r['driver']} | {r.get('kernel', '-')} | error: "
                         f"{r['error'].splitlines()[0][:120]} |" + " |" * 14)
            continue
        hot = r["sass"]["hot_loop"] or {}
        per_pair = "+".join(str(s["instr_per_pair"]) for s in r["sass"]["loading_loops"] if "instr_per_pair" in s)
        lines.append(
            f"| sm_{r['arch']} | {r['driver']} | {r['kernel']} | {_cfg(r)} | {', '.join(r['tags'])} | {r['regs']} | "
            f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['shared']} | {r['ctas_per_sm']} | "
            f"{r['warps_per_sm']} ({r['limited_by']}) | {per_pair or '-'} | "
            f"{hot.get('instructions', '-')} | {hot.get('bar', '-')} | {hot.get('shfl', '-')} | "
            f"{'yes' if hot.get('ldg_128') else 'no' if hot else '-'} | {r['sass']['loops_loading_global']} | "
            f"{r.get('waves', '-')} | {r['sass'].get('hgmma_total', '-')}/{r['sass'].get('hmma_total', '-')} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgpo-bench sass", description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--tokens", type=int, default=4096, help="rows N of the main launches")
    p.add_argument("--split-tokens", type=int, default=16, help="rows of the launches that split the vocab")
    p.add_argument("--hidden", type=int, default=3584, help="hidden size of fused_linear")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--arch", default="90a,80", help="comma list of 90a/90/80")
    p.add_argument("--kernels", nargs="*", default=None, help=f"regexes over the launches {list(DRIVERS)}")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.arch = [int(a.strip().lower().removeprefix("sm_").rstrip("a")) for a in args.arch.split(",") if a]
    except ValueError:
        parser.error(f"--arch takes a comma list like 90a,80, got {args.arch!r}")
    if bad := [a for a in args.arch if a not in ARCH_LIMITS]:
        parser.error(f"--arch: no limits table for {bad}; known: {sorted(ARCH_LIMITS)}")
    for name in ("vocab", "tokens", "split_tokens", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    os.environ["TRITON_INTERPRET"] = "0"  # before the kernels' modules are imported in this process
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    report = run(args)
    md = markdown(report)
    print(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    return 1 if any("error" in r for r in report["kernels"]) else 0


def run_in_subprocess(argv: list[str]) -> int:
    """The CLI's entry: a fresh interpreter with TRITON_INTERPRET=0 (the caller's may have imported triton with 1)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", f"{__package__}.sass", *argv], env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
