"""What the GPU check prints and what the planner reads from its JSON: one summary line per section (the device
tool returns only the output's tail), and `calibration`, the measured efficiencies (`cluster.calibration=PATH`)."""

from __future__ import annotations


def _fmt(value, spec: str = ".3g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _key_numbers(name: str, out: dict) -> str:
    if name == "versions":
        return (f"torch {out.get('torch')} | CUDA {out.get('cuda')} | {out.get('gpu', 'cpu')} | "
                f"peak {out.get('peak_bf16_tflops')} TFLOP/s | grouped mm {out.get('grouped_mm_path_bf16', '-')}")
    if name == "memory":
        return (f"copy {_fmt(out.get('hbm_copy_gbps'), '.0f')} GB/s | accumulation "
                f"{_fmt(out.get('grad_accumulation_ns_per_param'))} ns/param | optimizer "
                f"{_fmt(out.get('optimizer_ns_per_param'))} ns/param")
    if name == "train":
        launch, resume = out.get("launch", {}), out.get("resume", {})
        parts = launch.get("step_breakdown_s", {})
        return (f"loss {_fmt(launch.get('first_lm_loss'), '.3f')} -> {_fmt(launch.get('last_lm_loss'), '.3f')} | "
                f"mfu {_fmt(launch.get('mfu'), '.1%')} | {_fmt(launch.get('tokens_per_sec'), ',.0f')} tok/s | step "
                + " + ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f" s | ckpt blocked {launch.get('checkpoint_blocking_s')} s of {launch.get('checkpoint_save_total_s')}"
                f" s | resume load {resume.get('load_s')} s"
                + (f" | launch: {launch.get('error', launch.get('out_of_time'))[-160:]!r}"
                   if launch.get("error") or launch.get("out_of_time") else ""))
    if name == "stack":
        rows = out.get("rows", [])
        best = max(rows, key=lambda r: r["tflops"]) if rows else {}
        return (f"best {best.get('blocks')} blocks x mb {best.get('micro_batch')}: "
                f"{_fmt(best.get('ms_per_block_per_micro_batch'))} ms/block, {_fmt(best.get('tflops'), '.0f')} TFLOP/s, "
                f"mfu {_fmt(best.get('mfu'), '.1%')} | head+loss {_fmt(out.get('head_and_loss_ms_per_micro_batch'))} ms")
    if name == "grouped_gemm":
        cases = {k: v for k, v in out.items() if isinstance(v, dict) and "sizes" in v}
        return (f"dense {_fmt(out.get('dense_equal_flops', {}).get('tflops'), '.0f')} TFLOP/s | " + " | ".join(
            f"{k}: {'ok' if v['matches_loop'] else 'MISMATCH'} {_fmt(v.get('grouped_tflops'), '.0f')} TFLOP/s"
            for k, v in cases.items()) + f" | syncs {out.get('torch_call_syncs', {}).get('bf16_call_syncs', '-')}"
                + _fused_summary(out.get("fused_fp32_accumulation")))
    if name == "sdpa":
        return (f"causal default {_fmt(out.get('causal/default_ms'))} ms ({_fmt(out.get('causal/default_tflops'), '.0f')}"
                f" TFLOP/s) | document dense {_fmt(out.get('document_dense/default_ms'))} ms | flex: {out.get('flex')}"
                f" {_fmt(out.get('document_flex_ms', out.get('document_flex_forward_ms')))} ms")
    if name == "profile":
        share = out.get("bucket_share", {})
        return (" ".join(f"{k} {v:.0%}" for k, v in share.items())
                + f" | busy {_fmt(out.get('busy_percent'), '.0f')}% | syncs/block {out.get('host_syncs_per_block')}"
                + f" | top kernel {next(iter(out.get('top_kernels_ms', {})), '-')[:60]}")
    if name == "dispatcher":
        return " | ".join(f"{mode}: {v}" for mode, v in out.items())
    if name == "compile":
        if "skipped" in out:
            return out["skipped"]
        return (f"eager {_fmt(out.get('eager_ms'))} ms, compiled {_fmt(out.get('compiled_ms'))} ms "
                f"(x{_fmt(out.get('speedup'))}) | compile {_fmt(out.get('compile_s'), '.1f')} s, "
                f"{out.get('graph_breaks')} breaks, {out.get('frames_compiled_after_warmup')} recompiles | head full "
                f"{_fmt(out.get('head_full_ms'))} ms / chunked {_fmt(out.get('head_chunked_ms'))} ms")
    return ""


def summary_line(name: str, out: dict, seconds: float) -> str:
    status = "ERROR" if "error" in out else "OUT OF TIME" if "out_of_time" in out else "ok"
    try:
        numbers = _key_numbers(name, out)
    except Exception as e:  # a summary must never hide the section's JSON
        numbers = f"(summary failed: {type(e).__name__}: {e})"
    tail = f" | {out['error'].strip().splitlines()[-1][:200]}" if "error" in out else ""
    return f"[{name}] {seconds:.1f} s {status} | {numbers}{tail}"


def calibration(result: dict) -> dict:
    """The measured efficiencies, in the planner's terms (None where a section did not measure it)."""
    versions, memory = result.get("versions", {}), result.get("memory", {})
    grouped, sdpa = result.get("grouped_gemm", {}), result.get("sdpa", {})
    stack, train = result.get("stack", {}), result.get("train", {}).get("launch", {})
    rows = stack.get("rows") or [{}]
    sdpa_tflops = sdpa.get("causal/default_tflops")
    return {
        "device": versions.get("gpu"), "torch": versions.get("torch"), "smoke": versions.get("smoke"),
        "peak_bf16_tflops": versions.get("peak_bf16_tflops"),
        "dense_gemm_tflops": grouped.get("dense_equal_flops", {}).get("tflops"),
        "grouped_gemm_tflops": grouped.get("balanced", {}).get("grouped_tflops"),
        "attention_tflops": sdpa_tflops if isinstance(sdpa_tflops, float) else None,
        "hbm_gbps": memory.get("hbm_copy_gbps"),
        "grad_accumulation_ns_per_param": memory.get("grad_accumulation_ns_per_param"),
        "optimizer_ns_per_param": memory.get("optimizer_ns_per_param"),
        "block_tflops": max((r.get("tflops") or 0) for r in rows) or None,
        "train_mfu": train.get("mfu"),
        "train_step_breakdown_s": train.get("step_breakdown_s"),
        "train_micro_batches": result.get("train", {}).get("shape", {}).get("micro_batches_per_step"),
    }


def _fused_summary(fused: dict | None) -> str:
    if not fused:
        return ""
    exact = "exact" if fused.get("exact_to_fp32") else f"OFF BY {_fmt(fused.get('max_rel_error_vs_fp64'), '.1e')}"
    return (f" | fused fp32 accumulation: {exact}, fp32-out addmm {fused.get('fp32_out_addmm')}, "
            f"{_fmt(fused.get('fused_over_hooks'), '.2f')}x the hook path's time")
