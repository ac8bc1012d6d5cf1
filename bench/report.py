"""Markdown rendering of a benchmark run (the README's performance table)."""

from __future__ import annotations

from typing import Any

FRAMEWORK_LABELS = {
    "flax": "Flax NNX (jit)",
    "flax_twopass": "Flax NNX, two-pass BN var",
    "torch": "PyTorch eager",
    "torch_compile": "torch.compile",
}


def _fmt(v: Any, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def _mib(v: int | None) -> str:
    return "—" if v is None else f"{v / 2**20:,.0f}"


def ratio(results: dict[str, Any], num: str, den: str) -> float | None:
    a, b = results.get(num), results.get(den)
    if not a or not b or not a.get("ok") or not b.get("ok"):
        return None
    return a["images_per_s"] / b["images_per_s"]


def _roofline_table(run: dict[str, Any]) -> list[str]:
    """Flax steps against the roofline of their compiled kernels (GPU runs only: it needs
    the device's peak FLOP/s and bandwidth)."""
    rows = []
    for entry in run["results"]:
        for fw in ("flax", "flax_twopass"):
            r = entry["frameworks"].get(fw, {})
            if r.get("ok") and r.get("roofline_step_s"):
                ceiling = entry["config"]["batch"] / r["roofline_step_s"]
                rows.append(
                    f"| {entry['config']['name']} | {FRAMEWORK_LABELS[fw]} | {r['kernels']} | "
                    f"{r['hbm_traffic_bytes'] / 1e9:.2f} | {r['roofline_step_s'] * 1e3:.3f} | "
                    f"{ceiling:,.0f} | {r['images_per_s']:,.0f} | {r['of_roofline']:.0%} |"
                )
    if not rows:
        return []
    return [
        "",
        "| config | framework | kernels | modeled traffic GB | roofline step ms | "
        "ceiling images/s | measured images/s | of the ceiling |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def render_markdown(run: dict[str, Any]) -> str:
    meta = run["meta"]
    rounds = meta.get("repeats", 1) > 1
    twopass = "flax_twopass" in meta.get("frameworks", ())
    versions = " · ".join(
        f"{k} {meta[k]}" for k in ("jax", "flax", "torch", "cuda", "cudnn") if meta.get(k)
    )
    lines = [
        f"### Training-step benchmark — {meta['device']}",
        "",
        f"{meta['date']} · {versions} · "
        f"recipe {meta['recipe']} ({meta['optimizer']}) · TF32 {meta['tf32']} · "
        f"{meta['steps']} timed steps in {meta['windows']} windows after {meta['warmup']} warmup"
        + (f" steps (at least {meta['min_warmup_s']:g} s)" if meta.get("min_warmup_s") else "")
        + (f", best of {meta['repeats']} rounds" if meta.get("repeats", 1) > 1 else ""),
        "",
        "| config | framework | images/s | step ms median (p10–p90) | compile s | "
        "peak MiB | TFLOP/s | MFU |" + (" images/s per round |" if rounds else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if rounds else ""),
    ]
    for entry in run["results"]:
        name = entry["config"]["name"]
        for fw, r in entry["frameworks"].items():
            label = FRAMEWORK_LABELS.get(fw, fw)
            if not r.get("ok"):
                why = r.get("skipped") or r.get("error", "failed")
                lines.append(
                    f"| {name} | {label} | {why.splitlines()[0][:60]} | | | | | |"
                    + (" |" if rounds else "")
                )
                continue
            mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            lines.append(
                f"| {name} | {label} | {r['images_per_s']:,.0f} | "
                f"{r['step_ms_median']:.2f} ({r['step_ms_p10']:.2f}–{r['step_ms_p90']:.2f}) | "
                f"{r['compile_s']:.1f} | {_mib(r.get('peak_mem_bytes'))} | "
                f"{_fmt(r.get('achieved_tflops'), '.3g')} | {mfu} |"
                + (" " + " / ".join(f"{x:,.0f}" for x in r.get("rounds_images_per_s", []))
                   + " |" if rounds else "")
            )
    lines += [
        "",
        "| config | Flax / eager | Flax / compile | torch.compile / eager |"
        + (" Flax / two-pass BN |" if twopass else ""),
        "|---|---:|---:|---:|" + ("---:|" if twopass else ""),
    ]
    for entry in run["results"]:
        fws = entry["frameworks"]
        cells = [
            _fmt(ratio(fws, "flax", "torch"), ".2f"),
            _fmt(ratio(fws, "flax", "torch_compile"), ".2f"),
            _fmt(ratio(fws, "torch_compile", "torch"), ".2f"),
        ]
        if twopass:
            cells.append(_fmt(ratio(fws, "flax", "flax_twopass"), ".2f"))
        lines.append(f"| {entry['config']['name']} | " + " | ".join(cells) + " |")
    lines += _roofline_table(run)
    notes = list(meta["notes"])
    if not meta.get("on_gpu") and meta.get("loadavg_start"):
        end = meta.get("loadavg_end") or ["?"]
        notes.append(
            f"CPU load average (1 min) {meta['loadavg_start'][0]} at the start, {end[0]} at "
            f"the end, on {meta['device']}: other processes share the cores, so CPU timings "
            "are indicative only."
        )
    lines += ["", *[f"- {n}" for n in notes], ""]
    if run.get("input_pipeline"):
        from bench.input_pipeline import render

        lines += ["", render(run["input_pipeline"])]
    return "\n".join(lines)


def fmt_ms(seconds: float | None) -> str:
    """Seconds as milliseconds with three decimals, or an em dash for unknown."""
    return "—" if seconds is None else f"{seconds * 1e3:.3f}"


def size_bin_labels(bins: list[dict[str, Any]]) -> list[str]:
    """``a–b µs`` for each bin of ``hlo_kernels.by_size``, ``≥ a µs`` for the last."""
    edges = [f"{b['from_s'] * 1e6:g}" for b in bins]
    return [f"{lo}–{hi} µs" for lo, hi in zip(edges[:-1], edges[1:], strict=True)] + [
        f"≥ {edges[-1]} µs"]


def save_report(report: dict[str, Any], markdown: str, json_path: str | None,
                markdown_path: str | None) -> None:
    """Write a report's JSON and its Markdown rendering where asked."""
    import json
    from pathlib import Path

    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(markdown)


if __name__ == "__main__":  # python -m bench.report RESULTS.json  (re-render the table)
    import json
    import sys

    with open(sys.argv[1]) as f:
        print(render_markdown(json.load(f)))
