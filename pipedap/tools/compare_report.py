"""The comparison's arithmetic and its tables: the bound max(compute, communication) of each
setting (see [Note: the bound] in :mod:`pipedap.tools.compare`) and every system against it.

``python -m pipedap.tools.compare_report OUT/compare.json`` prints a sweep's Markdown table
(the README's tables are generated this way from the JSON committed under benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import models
from pipedap.planner import energy
from pipedap.tools.compare_jobs import telling_line
from pipedap.tools.stats import paired_ratio, round_throughputs
from pipedap.units import parse_rate_bps

REFERENCE = "PipeDAP"  # whose speedup over the others is reported
SPEEDUP_BASE = "DDP"  # the chart's speedups are over this one


def gradient_bytes(model: str) -> int:
    """Bytes of the model's gradients: float32, one per parameter."""
    return models.count_parameters(model) * 4


def ring_allreduce_s(nbytes: float, ranks: int, rate_bps: float) -> float:
    """Seconds a ring all-reduce of ``nbytes`` needs on links of ``rate_bps``: 2(p-1)/p x bytes per link."""
    return 2 * (ranks - 1) / ranks * nbytes * 8 / rate_bps if ranks > 1 else 0.0


def reachable_bound(compute: float, link: float, sigma: float) -> float:
    """[Note: the reachable bound] No data-parallel system on PipeDAP's engine, on hosts whose
    computing core also moves the bytes, beats ``max(link, compute + link x σ / (1 + σ))``:

    * ``link``: the link busy for the gradients' bytes at the nominal rate. Not the calibrated
      one: calibration's 16 MB all-reduces can understate what the link carries (at 500 Mbit/s
      they reached 399 Mbit/s while PipeDAP moved VGG-16's gradients in less time than that
      rate allows), and a bound must not be above what a system can reach;
    * the CPU cost of those bytes: compute beside a busy link takes ``1 + σ`` times as long
      (:mod:`pipedap.interference`), so each second of busy link costs the computing core
      ``σ / (1 + σ)`` of a second. At best the link is busy only while compute runs, which
      gives compute plus that cost for every second the link is busy.

    σ is the one the planner measured in the setting's own jobs (see ``interference`` in
    :func:`compare_row`), so the bound follows PipeDAP's engine's cost on this machine. For
    another transport it is an estimate: DDP over gloo, which may cost the core less per busy
    second, ran 1.8% under it once (ResNet-50 at 500 Mbit/s, within its interval).
    """
    return max(link, compute + link * sigma / (1 + sigma))


def compare_row(model: str, hosts: int, ranks: int, batch_size: int, rate: str, compute: float, comm: float,
                achieved_bps: float | None, runs: dict[str, dict], powers: energy.Powers | None = None,
                interference: list[float] | None = None) -> dict:
    """The bound of one setting and each system's distance from it and PipeDAP's speedup over it;
    with ``powers``, each system's energy per sample (:func:`pipedap.planner.energy.job_estimate`:
    compute busy for the compute-only time, the link for the bytes its bound counts). With
    ``interference`` (the σ each planned job of the setting measured), the reachable bound too
    ([Note: the reachable bound]), each system's distance from it, and how far above it DDP is:
    the most any system can gain over DDP here."""
    bound = max(compute, comm)
    comm_achieved = comm * parse_rate_bps(rate) / achieved_bps if achieved_bps else None
    sigma = sum(interference) / len(interference) if interference else None
    reachable = reachable_bound(compute, comm, sigma) if sigma is not None else None
    # speedups in samples per second of the whole job: the unit that is fair across parallelisms
    ok = {label: r["throughput"]["mean"] for label, r in runs.items() if r["status"] == "ok"}
    per_round = {label: round_throughputs(runs[label]) for label in ok}
    systems = {}
    for label, r in runs.items():
        entry = {"status": r["status"]}
        if label in ok:
            t = r["batch_s"]["mean"]
            own = r.get("own_bound")  # a pipeline's or a compressed system's bound (else the row's)
            limit = own["bound_s"] if own else bound
            # a compressed system's link carries a fraction of the bytes; a pipeline has no reachable bound here
            fraction = 1.0 if own is None else own["comm_s"] / comm if "comm_s" in own else None
            own_reachable = (reachable_bound(compute, comm * fraction, sigma)
                             if sigma is not None and fraction is not None else None)
            entry.update(batch_s=t, ci95=r["batch_s"]["ci95"], window_s=r["batch_s"].get("window_mean"),
                         throughput=ok[label], throughput_ci95=r["throughput"]["ci95"],
                         bound_s=limit, over_bound_pct=100 * (t / limit - 1) if limit else None,
                         reachable_s=own_reachable,
                         over_reachable_pct=100 * (t / own_reachable - 1) if own_reachable else None,
                         pipedap_speedup=ok[REFERENCE] / ok[label] if REFERENCE in ok else None,
                         speedup_over_ddp=ok[label] / ok[SPEEDUP_BASE] if SPEEDUP_BASE in ok else None,
                         paired_pipedap_speedup=paired_ratio(per_round[REFERENCE], per_round[label])
                         if REFERENCE in ok else None,
                         paired_speedup_over_ddp=paired_ratio(per_round[label], per_round[SPEEDUP_BASE])
                         if SPEEDUP_BASE in ok else None,
                         predicted_s=r["predicted_s"], predicted_over_measured=r["predicted_over_measured"],
                         own_bound=own)
            link_s = comm if own is None else own.get("comm_s", own.get("link_s"))  # a pipeline's boundary
            if powers is not None and link_s is not None:
                joules = energy.job_estimate(powers, ranks, ok[label], compute / batch_size, link_s / batch_size)
                entry.update(energy=joules, joules_per_sample=joules["joules_per_sample"], joules_ci95=None)
        else:
            entry["why"] = r.get("reason") or telling_line(r.get("error_tail", ""))
        systems[label] = entry
    ddp = systems.get(SPEEDUP_BASE, {})
    return {"model": model, "hosts": hosts, "ranks": ranks, "batch_size": batch_size, "rate": rate, "rate_bps": parse_rate_bps(rate),
            "gradient_bytes": gradient_bytes(model), "compute_s": compute, "comm_s": comm,
            "comm_achieved_s": comm_achieved, "achieved_bps": achieved_bps, "bound_s": bound,
            "bound_achieved_s": max(compute, comm_achieved) if comm_achieved else None,
            "bound_throughput": ranks * batch_size / bound,
            "bound_by": "compute" if compute >= comm else "communication", "comm_over_compute": comm / compute,
            "interference": None if sigma is None else {"mean": sigma, "runs": list(interference)},
            "reachable_s": reachable, "cpu_cost_s": None if sigma is None else comm * sigma / (1 + sigma),
            "ddp_over_reachable": ddp["batch_s"] / reachable if reachable and "batch_s" in ddp else None,
            "systems": systems}


def table(rows: list[dict]) -> str:
    """The comparison as text: one block per setting, one line per system."""
    lines = []
    for row in rows:
        achieved = (f", achieved {row['achieved_bps'] / 1e6:.0f} Mbit/s -> {row['comm_achieved_s']:.2f} s"
                    if row["achieved_bps"] else "")
        lines += ["", f"{row['model']}, {row['ranks']} ranks on {row['hosts']} hosts, {row['rate']}: "
                      f"compute {row['compute_s']:.2f} s, all-reduce {row['gradient_bytes'] / 1e6:.0f} MB at "
                      f"nominal {row['comm_s']:.2f} s{achieved}; bound {row['bound_s']:.2f} s ({row['bound_by']}), "
                      f"comm/compute {row['comm_over_compute']:.2f}" + reachable_line(row),
                  f"  {'system':<15} {'s/batch':>15} {'window':>7} {'samples/s':>13} {'vs bound':>9} {'vs reach':>9} "
                  f"{'PipeDAP x':>9} {'x DDP, paired':>14} {'predicted':>9} {'pred/meas':>9}"
                  + (f" {'J/sample':>9}" if any("energy" in s for s in row["systems"].values()) else "")]
        for label, s in row["systems"].items():
            if s["status"] != "ok":
                lines.append(f"  {label:<15} {s['status'].upper()}: {s['why']}")
                continue
            lines.append(f"  {label:<15} {s['batch_s']:7.3f} +-{fmt(s['ci95'], '.3f'):>6} "
                         f"{fmt(s.get('window_s'), '7.3f'):>7} {s['throughput']:6.2f} +-{fmt(s['throughput_ci95'], '.2f'):>4} "
                         f"{fmt(s['over_bound_pct'], '+8.1f'):>8}% {fmt(s.get('over_reachable_pct'), '+8.1f'):>8}% "
                         f"{fmt(s['pipedap_speedup'], '.2f'):>9} "
                         f"{paired(s.get('paired_speedup_over_ddp')):>14} "
                         f"{fmt(s['predicted_s'], '.3f'):>9} {fmt(s['predicted_over_measured'], '.2f'):>9}"
                         + (f" {s['joules_per_sample']:9.3f}" if "energy" in s else ""))
    return "\n".join(lines)


def reachable_line(row: dict) -> str:
    """The reachable bound's terms, and the most any system can gain over DDP, when σ was measured."""
    if row.get("reachable_s") is None:
        return ""
    headroom = (f"; DDP is {row['ddp_over_reachable']:.2f}x it (the most any system can gain over DDP here)"
                if row.get("ddp_over_reachable") else "")
    return (f"\n  reachable {row['reachable_s']:.2f} s = max(link {row['comm_s']:.2f} s, compute + the CPU cost of its bytes "
            f"{row['cpu_cost_s']:.2f} s at interference {100 * row['interference']['mean']:+.0f}%){headroom}")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def paired(ratio: dict | None) -> str:
    """A paired ratio as ``mean +-interval`` (the interval left out with one round)."""
    if ratio is None:
        return "-"
    return f"{ratio['mean']:.3f}" + (f" +-{ratio['ci95']:.3f}" if ratio["ci95"] is not None else "")


def markdown(rows: list[dict]) -> str:
    """Per (model, hosts): one Markdown table, a line per rate with the bound (and the other bounds
    some systems are judged against), the reachable bound where σ was measured, and each system's
    seconds per batch, mean +- 95% interval."""
    tables: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        tables.setdefault((row["model"], row["hosts"]), []).append(row)
    out = []
    for (model, hosts), panel in tables.items():
        labels: list[str] = []
        for row in panel:
            labels += [k for k, s in row["systems"].items() if s["status"] == "ok" and k not in labels]
        reach = any(row.get("reachable_s") for row in panel)  # sweeps before σ was recorded have none
        out += [f"{model}, batch {panel[0]['batch_size']} per rank, {panel[0]['ranks']} ranks on {hosts} hosts:", "",
                f"| rate | bound |{' reachable |' * reach} {' | '.join(labels)} |",
                "|" + "---|" * (len(labels) + 2 + reach)]
        for row in panel:
            bound = with_others(row, "bound_s", lambda s: (s.get("own_bound") or {}).get("bound_s"))
            cells = [f"{s['batch_s']:.2f} +- {fmt(s['ci95'], '.2f')}" if s.get("status") == "ok" else "-"
                     for s in (row["systems"].get(label, {}) for label in labels)]
            reachable = f" {with_others(row, 'reachable_s', lambda s: s.get('reachable_s'))} |" * reach
            out.append(f"| {row['rate_bps'] / 1e6:g} Mbit/s | {bound} |{reachable} {' | '.join(cells)} |")
        out.append("")
    return "\n".join(out)


def with_others(row: dict, key: str, own: Callable[[dict], float | None]) -> str:
    """A row's bound ``key``, with the different ones some of its systems are judged against
    (``own(system)``), named by why: "4.18 (fp16: 2.09)"."""
    others = {}
    for s in row["systems"].values():
        value = own(s)
        if value and row.get(key) and abs(value - row[key]) >= 0.005:
            why = (s.get("own_bound") or {}).get("why", "pipeline")
            others[why.removeprefix("gradients as ")] = value
    return fmt(row.get(key), ".2f") + (f" ({', '.join(f'{k}: {v:.2f}' for k, v in others.items())})" if others else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedap.tools.compare_report",
                                     description="Print a sweep's Markdown table (as the README quotes it).")
    parser.add_argument("compare_json", help="a sweep's compare.json, or a sweep committed under benchmarks/results")
    args = parser.parse_args(argv)
    try:
        doc = json.loads(Path(args.compare_json).read_text())
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"cannot read {args.compare_json}: {e}")
    if not isinstance(doc, dict) or "comparison" not in doc:
        parser.error(f"{args.compare_json} is not a sweep's JSON (no 'comparison'): pass OUT/compare.json of "
                     "python -m pipedap.tools.compare")
    print(markdown(doc["comparison"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
