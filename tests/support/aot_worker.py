"""Compile the AOT cases for one GPU arch and print {case id: record} as JSON (run without the interpreter).

Usage: python tests/support/aot_worker.py ARCH. It runs in its own process because TRITON_INTERPRET=1 (set for the rest of
the suite) turns @triton.jit functions into interpreted ones that cannot be compiled.
"""

import glob
import importlib
import json
import os
import re
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))



def all_cases():
    cases = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "aot_cases*.py"))):
        cases += importlib.import_module(os.path.basename(path)[:-3]).CASES
    return cases


def compile_case(arch, module, name, signature, constexprs, num_warps, hints=()):
    """Compile one case -> its record: cubin size, static shared memory, and whether the PTX has tensor-core MMA
    (mma.sync / wgmma) and software-pipelined loads (cp.async). hints: args given the divisibility-by-16 hint."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), name)
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in hints}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptx = kernel.asm.get("ptx", "")
    if not kernel.asm.get("cubin") or ".entry" not in ptx:
        raise RuntimeError("no cubin/ptx entry produced")
    # atomics that order memory (tl.atomic_add's default sem="acq_rel": atom + a GPU-wide fence and an L1 invalidate in
    # SASS around each one) vs fire-and-forget reductions (sem="relaxed": red)
    fenced = sorted(set(re.findall(r"atom\.global\.[\w.]*(?:acq_rel|acquire|release)[\w.]*", ptx)))
    return {"ok": True, "cubin": len(kernel.asm["cubin"]), "shared": kernel.metadata.shared, "mma": "mma.sync" in ptx,
            "wgmma": "wgmma" in ptx, "pipelined": "cp.async" in ptx, "fenced_atomics": fenced,
            "relaxed_reductions": "red.global" in ptx and ".relaxed." in ptx}


def main():
    os.environ["TRITON_INTERPRET"] = "0"  # before anything imports triton in this process
    arch = int(sys.argv[1])
    results = {}
    for case_id, *case in all_cases():
        try:
            results[case_id] = compile_case(arch, *case)
        except Exception:
            results[case_id] = {"ok": False, "error": traceback.format_exc(limit=3)[-2000:]}
    print("AOT-RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
